"""The one door every attention in mmjax goes through.

Layout is `[batch, seq, heads, head_dim]`; a boolean `mask` broadcastable to
`[batch, heads, q_len, kv_len]` marks the pairs that may attend (True = attend).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.errors import ConfigError

IMPLS = ("xla", "cudnn")


def dot_product_attention(q, k, v, *, bias=None, mask=None, causal=False, impl="xla"):
  """Softmax(q·kᵀ/√d + bias, masked) · v, with softmax statistics in float32."""
  if impl not in IMPLS:
    raise ConfigError(f"attention impl={impl!r} is not one of {IMPLS}")
  if impl == "cudnn":
    # cuDNN's fused kernel exists only on NVIDIA GPUs; elsewhere JAX picks its XLA path.
    backend_impl = "cudnn" if jax.default_backend() == "gpu" else None
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=causal,
                                        implementation=backend_impl)
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if causal:
    q_len, kv_len = q.shape[1], k.shape[1]
    # Queries are aligned to the end of the keys, as when decoding with a cache.
    allowed = jnp.tril(jnp.ones((q_len, kv_len), bool), k=kv_len - q_len)
    mask = allowed if mask is None else jnp.logical_and(mask, allowed)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
