"""Perceivers: Flamingo's Resampler, and Perceiver IO (encoder, latent transformer, query decoder).

Perceiver Resampler: a fixed number of visual tokens per image, whatever the patch count.

`num_latents` learned latents attend, in each of `depth` pre-norm layers, to the image's patch
tokens concatenated with the latents themselves (keys and values from both), then pass through
an MLP. A learned media embedding, one row per image slot of a sequence (up to `max_media`), is
added to the patch tokens first so the resampled tokens of image 0, 1, ... differ. A final
LayerNorm and a projection to `out_width` (the language model's width) follow.

Perceiver IO (Jaegle et al. 2021, 2022): `num_latents` learned latents read M inputs by
cross-attention, so the cost is linear in M; a latent transformer processes them, and learned
(or given) output queries read the answer off the latents by a last cross-attention.
`PerceiverClassifier` feeds it an image's pixels (or p x p patches) with 2-D Fourier position
features and decodes one query into class logits.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError
from mmjax.models.layers import MlpBlock, MultiHeadDotProductAttention, dense, layer_norm
from mmjax.models.vit import Encoder1DBlock


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
      q = layer_norm(f"latents_norm_{i}", self.dtype, self.norm_eps)(y)
      kv = jnp.concatenate([layer_norm(f"media_norm_{i}", self.dtype, self.norm_eps)(x), q], axis=1)
      y = y + MultiHeadDotProductAttention(self.num_heads, self.dtype, self.attention_impl,
                                           name=f"attention_{i}")(q, kv)
      h = layer_norm(f"mlp_norm_{i}", self.dtype, self.norm_eps)(y)
      y = y + MlpBlock(self.mlp_dim, dtype=self.dtype, name=f"mlp_{i}")(h, not train)
    y = layer_norm("final_norm", self.dtype, self.norm_eps)(y)
    y = dense(self.out_width, ("embed", "proj"), "proj", self.dtype)(y)
    return y.reshape(batch, media, self.num_latents, self.out_width)


class CrossAttentionBlock(nn.Module):
  """Pre-LN cross-attention: queries + attn(LN(queries), LN(inputs)), then + mlp(LN(.))."""
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, queries, inputs, deterministic=True):
    q = layer_norm("query_norm", self.dtype, self.norm_eps)(queries)
    kv = layer_norm("input_norm", self.dtype, self.norm_eps)(inputs)
    y = queries + MultiHeadDotProductAttention(self.num_heads, self.dtype, self.attention_impl, name="attention")(q, kv)
    h = layer_norm("mlp_norm", self.dtype, self.norm_eps)(y)
    return y + MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(h, deterministic)


class PerceiverIO(nn.Module):
  """`(inputs [batch, M, channels], queries [batch, O, width] | None) -> [batch, O, output_width]`.

  Inputs are projected to `width`; then `num_iterations` times: cross-attend the latents to
  them, then `self_attention_depth` latent self-attention blocks. With `share_weights`,
  iterations after the first reuse one set of weights (the Perceiver paper's sharing). Without
  `queries`, `num_outputs` learned output queries decode.
  """
  num_latents: int
  width: int
  num_iterations: int
  self_attention_depth: int
  num_heads: int
  mlp_dim: int
  num_outputs: int
  output_width: int
  cross_heads: int = 1
  share_weights: bool = True
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  norm_eps: float = 1e-6

  def _block(self, kind, name):
    kw = dict(mlp_dim=self.mlp_dim, dtype=self.dtype, attention_impl=self.attention_impl, norm_eps=self.norm_eps)
    if kind == "cross":
      return CrossAttentionBlock(self.cross_heads, name=name, **kw)
    return Encoder1DBlock(num_heads=self.num_heads, name=name, **kw)

  @nn.compact
  def __call__(self, inputs, queries=None, train=False):
    if self.num_iterations < 1:
      raise ConfigError(f"model.num_iterations={self.num_iterations}: expected at least 1")
    batch = inputs.shape[0]
    x = dense(self.width, (None, "embed"), "input_proj", self.dtype)(jnp.asarray(inputs, self.dtype))
    latents = self.param("latents", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                                 (None, "embed")), (self.num_latents, self.width))
    z = jnp.broadcast_to(latents.astype(self.dtype), (batch, self.num_latents, self.width))

    def blocks(tag):
      return (self._block("cross", f"cross_{tag}"),
              [self._block("self", f"self_{tag}_{j}") for j in range(self.self_attention_depth)])

    shared = blocks("shared") if self.share_weights and self.num_iterations > 1 else None
    for i in range(self.num_iterations):
      cross, layers = blocks(str(i)) if i == 0 or shared is None else shared
      z = cross(z, x, not train)
      for layer in layers:
        z, _ = layer(z, not train)
    if queries is None:
      learned = self.param("output_queries", nn.with_logical_partitioning(
          nn.initializers.normal(stddev=0.02), (None, "embed")), (self.num_outputs, self.width))
      queries = jnp.broadcast_to(learned.astype(self.dtype), (batch, self.num_outputs, self.width))
    y = self._block("cross", "decoder")(queries, z, not train)
    y = layer_norm("final_norm", self.dtype, self.norm_eps)(y)
    return dense(self.output_width, ("embed", "proj"), "output_proj", self.dtype)(y)


def fourier_position_features(height: int, width: int, num_bands: int, max_resolution: float) -> np.ndarray:
  """`[height * width, 2 + 4 * num_bands]`: positions in [-1, 1] per axis, then sin and cos of
  pi * f * position for `num_bands` frequencies f from 1 to max_resolution / 2 (Perceiver's encoding)."""
  ys, xs = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
  pos = np.stack([ys.ravel(), xs.ravel()], axis=1)
  freqs = np.linspace(1.0, max_resolution / 2, num_bands)
  angles = np.pi * pos[:, :, None] * freqs  # [M, 2, bands]
  return np.concatenate([pos, np.sin(angles).reshape(len(pos), -1), np.cos(angles).reshape(len(pos), -1)],
                        axis=1).astype(np.float32)


class PerceiverClassifier(nn.Module):
  """`image [batch, H, W, C] -> logits [batch, num_classes]`: p x p patches (p = 1: pixels) with Fourier
  position features as Perceiver IO inputs, one learned output query."""
  num_classes: int
  patch_size: int
  num_bands: int
  perceiver: dict

  @nn.compact
  def __call__(self, image, train=False):
    p = self.patch_size
    batch, height, width, channels = image.shape
    h, w = height // p, width // p
    patches = image[:, :h * p, :w * p].reshape(batch, h, p, w, p, channels).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(batch, h * w, p * p * channels)
    positions = fourier_position_features(h, w, self.num_bands, max(h, w))
    inputs = jnp.concatenate([patches, jnp.broadcast_to(positions, (batch, *positions.shape))], axis=-1)
    model = PerceiverIO(num_outputs=1, output_width=self.num_classes, name="perceiver", **self.perceiver)
    return model(inputs, train=train)[:, 0]
