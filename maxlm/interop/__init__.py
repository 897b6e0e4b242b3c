"""Interoperability: Hugging Face conversion and loading a base (maxlm workdir or HF folder)."""
