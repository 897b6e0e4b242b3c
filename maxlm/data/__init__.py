"""Pretraining data: random-access document sources (sources.py) and the packed batch iterator (packing.py)."""

from maxlm.data.packing import Batch, PackedIterator
from maxlm.data.sources import (
    SKIP_REASONS,
    JsonlSource,
    Source,
    StdlibSource,
    Subset,
    TfdsSource,
    iter_texts,
    make_base_source,
    make_source,
    split_indices,
)

__all__ = [
    "SKIP_REASONS", "Batch", "JsonlSource", "PackedIterator", "Source", "StdlibSource", "Subset", "TfdsSource",
    "iter_texts", "make_base_source", "make_source", "split_indices",
]
