"""Flamingo's GATED XATTN-DENSE block and the "immediately preceding media" mask.

Text token i attends only to the visual tokens of its media index `media[b, i]`: the image
of the last `<image>` token at or before it (-1: none yet). A token without media gets an
exactly zero cross-attention output (not even the output projection's bias), so text before
the first image is unchanged by the xattn half of the block.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.layers import ACT_AXES, MlpBlock, MultiHeadDotProductAttention, layer_norm


def media_attention_mask(media, num_media: int, num_latents: int):
  """Bool [batch, 1, seq, num_media * num_latents]: token i sees the latents of image `media[b, i]`.

  `media` int [batch, seq]; -1 (or any index outside `0..num_media-1`) sees nothing.
  """
  sees = media[:, :, None] == jnp.arange(num_media)  # [batch, seq, num_media]
  return jnp.repeat(sees, num_latents, axis=2)[:, None]


class GatedCrossAttentionBlock(nn.Module):
  """`y += tanh(alpha_xattn) * xattn(norm(y), visual)`, then `y += tanh(alpha_dense) * mlp(norm(y))`.

  Both gates are scalar parameters initialised at 0, so a fresh block is the identity.
  `__call__(y [batch, seq, width], visual [batch, media, latents, width], media [batch, seq])`,
  `media` holding each token's image index (-1: none).
  """
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, y, visual, media, train=False):
    batch, num_media, latents, width = visual.shape
    mask = media_attention_mask(media, num_media, latents)

    def gate(name):
      alpha = self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, ()), ())
      return jnp.tanh(alpha).astype(self.dtype)

    h = layer_norm("attention_norm", self.dtype, self.norm_eps)(y)
    h = MultiHeadDotProductAttention(self.num_heads, self.dtype, self.attention_impl, name="attention")(
        h, visual.reshape(batch, num_media * latents, width).astype(self.dtype), mask=mask)
    h = jnp.where(jnp.any(mask, axis=-1)[:, 0, :, None], h, 0)
    y = y + gate("alpha_xattn") * h
    h = layer_norm("mlp_norm", self.dtype, self.norm_eps)(y)
    y = y + gate("alpha_dense") * MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(h, not train)
    return nn.with_logical_constraint(y, ACT_AXES)
