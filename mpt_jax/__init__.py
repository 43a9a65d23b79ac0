"""mpt-jax: MosaicML's MPT-1b-RedPajama-200b in JAX/Flax."""

from mpt_jax.config import MPTConfig
from mpt_jax.model import MPTForCausalLM

__all__ = ["MPTConfig", "MPTForCausalLM"]
