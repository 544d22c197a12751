"""Flamingo's Perceiver Resampler: a fixed number of visual tokens per image, whatever the patch count.

`num_latents` learned latents attend, in each of `depth` pre-norm layers, to the image's patch
tokens concatenated with the latents themselves (keys and values from both), then pass through
an MLP. A learned media embedding, one row per image slot of a sequence (up to `max_media`), is
added to the patch tokens first so the resampled tokens of image 0, 1, ... differ. A final
LayerNorm and a projection to `out_width` (the language model's width) follow.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.vit import MlpBlock, MultiHeadDotProductAttention, _dense, _layer_norm


class PerceiverResampler(nn.Module):
  """`(features [batch, media, tokens, width]) -> [batch, media, num_latents, out_width]`."""
  depth: int
  num_latents: int
  num_heads: int
  mlp_dim: int
  max_media: int
  out_width: int
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, train=False):
    batch, media, tokens, width = x.shape
    if media > self.max_media:
      raise ConfigError(f"{media} images per sequence exceed model.perceiver.max_media={self.max_media}")
    media_embedding = self.param("media_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.02), (None, "embed")), (self.max_media, width))
    x = jnp.asarray(x, self.dtype) + media_embedding[:media, None].astype(self.dtype)
    x = x.reshape(batch * media, tokens, width)
    latents = self.param("latents", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                                 (None, "embed")), (self.num_latents, width))
    y = jnp.broadcast_to(latents.astype(self.dtype), (batch * media, self.num_latents, width))
    for i in range(self.depth):
      q = _layer_norm(f"latents_norm_{i}", self.dtype, self.norm_eps)(y)
      kv = jnp.concatenate([_layer_norm(f"media_norm_{i}", self.dtype, self.norm_eps)(x), q], axis=1)
      y = y + MultiHeadDotProductAttention(self.num_heads, self.dtype, self.attention_impl,
                                           name=f"attention_{i}")(q, kv)
      h = _layer_norm(f"mlp_norm_{i}", self.dtype, self.norm_eps)(y)
      y = y + MlpBlock(self.mlp_dim, dtype=self.dtype, name=f"mlp_{i}")(h, not train)
    y = _layer_norm("final_norm", self.dtype, self.norm_eps)(y)
    y = _dense(self.out_width, ("embed", "proj"), "proj", self.dtype)(y)
    return y.reshape(batch, media, self.num_latents, self.out_width)
