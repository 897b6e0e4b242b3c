"""Pretraining data: random-access document sources (sources.py) and the packed batch iterator (packing.py)."""

from maxlm.data.mixture import make_source
from maxlm.data.packing import Batch, PackedIterator, gather_state, merge_states
from maxlm.data.sources import (
    SKIP_REASONS,
    JsonlSource,
    Source,
    StdlibSource,
    Subset,
    TfdsSource,
    iter_texts,
    make_base_source,
    split_indices,
)

__all__ = [
    "SKIP_REASONS", "Batch", "JsonlSource", "PackedIterator", "Source", "StdlibSource", "Subset", "TfdsSource",
    "gather_state", "iter_texts", "make_base_source", "make_source", "merge_states", "split_indices",
]
