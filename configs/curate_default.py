"""The default curation pipeline (python -m maxlm.curate): every stage but the long-context selection, Gopher's
rule thresholds, MinHash dedup at Jaccard 0.8 over character 5-grams, and the README's tiny model (runs/tiny)
as the perplexity scorer.
The schema and each default's reason are in maxlm/config.py (curate_config)."""

from maxlm.config import curate_config


def get_config():
    return curate_config()
