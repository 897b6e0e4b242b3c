"""Inference: the continuous-batching generation engine (`engine`) and the OpenAI-compatible server (`server`)."""
