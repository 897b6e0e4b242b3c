"""Attention kernels for maxlm. `reference` is the plain-jnp semantics all implementations are tested against."""

from kernels.reference import MASK_VALUE, attention_mask, mha_reference

__all__ = ["MASK_VALUE", "attention_mask", "mha_reference"]
