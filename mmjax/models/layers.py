"""The layers every model shares: dense and LayerNorm with logical axis names, the MLP block,
multi-head attention, the activations, and the logical axes of a block's activations.

Parameter names follow big_vision's ViT (`Dense_0`/`Dense_1`, `query/key/value/out`), so
released weights map onto every model built from them.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.ops.attention import dot_product_attention
from mmjax.ops.dense import dense_dot_general

# Logical axes of the activations between blocks: [batch, sequence, width].
ACT_AXES = ("act_batch", "act_seq", "act_embed")

ACTIVATIONS = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    # Exact GELU through erf: faster on XLA:CPU than jax.nn.gelu's erfc form (benchmarks/RESULTS.md).
    "gelu": lambda x: 0.5 * x * (1 + jax.lax.erf(x * 2 ** -0.5)),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
}


def dense(features, axes, name, dtype, kernel_init=nn.initializers.xavier_uniform(),
          bias_init=nn.initializers.zeros, use_bias=True):
  """`nn.Dense` with its kernel partitioned by the logical `axes` (in, out) and its bias by the last."""
  return nn.Dense(features, dtype=dtype, name=name, use_bias=use_bias, dot_general=dense_dot_general,
                  kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                  bias_init=nn.with_logical_partitioning(bias_init, axes[-1:]))


def layer_norm(name, dtype, eps):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


class MlpBlock(nn.Module):
  mlp_dim: int
  act: str = "gelu_tanh"
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    width = x.shape[-1]
    normal = nn.initializers.normal(stddev=1e-6)
    x = dense(self.mlp_dim, ("embed", "mlp"), "Dense_0", self.dtype, bias_init=normal)(x)
    x = ACTIVATIONS[self.act](x)
    x = nn.Dropout(self.dropout)(x, deterministic)
    return dense(width, ("mlp", "embed"), "Dense_1", self.dtype, bias_init=normal)(x)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with flax's parameter layout (`query/key/value/out`), via the door."""
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x_q, x_kv=None, *, mask=None, causal=False, bias=None, q_segment_ids=None,
               kv_segment_ids=None):
    x_kv = x_q if x_kv is None else x_kv
    width = x_q.shape[-1]
    if width % self.num_heads:
      raise ConfigError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    # Initialised like flax's DenseGeneral: fans over the flattened (embed) x (heads * kv) matrix.
    qkv_init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))

    def proj(name):
      return nn.Einsum((width, self.num_heads, head_dim), "bld,dhk->blhk", dtype=self.dtype, name=name,
                       kernel_init=nn.with_logical_partitioning(qkv_init, ("embed", "heads", "kv")),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")))

    q, k, v = proj("query")(x_q), proj("key")(x_kv), proj("value")(x_kv)
    y = dot_product_attention(q, k, v, bias=bias, mask=mask, causal=causal, q_segment_ids=q_segment_ids,
                              kv_segment_ids=kv_segment_ids, impl=self.attention_impl)
    out_init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
    return nn.Einsum((self.num_heads, head_dim, width), "blhk,hkd->bld", dtype=self.dtype, name="out",
                     kernel_init=nn.with_logical_partitioning(out_init, ("heads", "kv", "embed")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(y)
