"""Evaluation: the harness (CLI, built-in tasks), multiple choice, generation, contamination, passkey."""
