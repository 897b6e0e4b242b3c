"""Attention kernels for maxlm.

`flash_attention` is the public entry point (Pallas flash attention, forward and backward, GPU and TPU
lowerings, interpreted on CPU); `reference` is the plain-jnp semantics every implementation is tested
against.
"""

from kernels.flash_attention import BlockSizes, compile_target, default_backend, flash_attention
from kernels.reference import MASK_VALUE, attention_mask, mha_reference

__all__ = ["MASK_VALUE", "BlockSizes", "attention_mask", "compile_target", "default_backend", "flash_attention",
           "mha_reference"]
