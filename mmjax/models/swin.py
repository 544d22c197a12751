"""Swin Transformer (Liu et al. 2021): an image tower of hierarchical stages of shifted-window attention.

`(images NHWC) -> (head output or pooled features, aux)`, like `ViT`. The image is cut into
p x p patches (the ViT's `PatchEmbed`) and normalised; each stage is `depths[i]` blocks of
attention inside non-overlapping `window_size` x `window_size` windows, every second block
on windows shifted by half a window (a cyclic roll, with a mask keeping the wrapped regions
apart), each window's attention biased by a learned table indexed by relative position; stages
after the first start with patch merging (each 2 x 2 group of tokens concatenated, normalised
and reduced to twice the width). A window larger than a stage's feature map shrinks to it,
without shift; feature maps are padded to whole windows (and to even sizes before merging).
`aux` holds each stage's feature map (`stage<i>`, [batch, h, w, width]) and the final tokens
(`encoded`). The computation follows HF transformers' `SwinModel`, its parity reference.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError
from mmjax.models.layers import MlpBlock, MultiHeadDotProductAttention, dense, layer_norm
from mmjax.models.vit import PatchEmbed, tower_head

# HF's and the paper's value for "different region": exp(-100) is 0 in float32 softmax.
_MASKED = -100.0


def swin_output_width(width: int, depths) -> int:
  """The width of a Swin's output tokens: each merge doubles the first stage's `width`."""
  return width * 2 ** (len(depths) - 1)


def window_partition(x, window: int):
  """[batch, H, W, C] -> [batch * windows, window², C], windows in row-major order within each image."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, c)


def window_reverse(windows, window: int, batch: int, height: int, width: int):
  """Inverse of `window_partition`."""
  c = windows.shape[-1]
  x = windows.reshape(batch, height // window, width // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, height, width, c)


def relative_position_index(window: int) -> np.ndarray:
  """[window², window²] row of the bias table for each (query, key) pair of a window."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
  return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """[windows, window², window²] additive mask for attention on a feature map rolled by -shift:
  0 between tokens of the same region before the roll, _MASKED between wrapped-around regions."""
  def regions(n):
    index = np.arange(n)
    return (index >= n - window).astype(np.int32) + (index >= n - shift)

  labels = (regions(height)[:, None] * 3 + regions(width)[None, :])[None, :, :, None]
  labels = window_partition(labels, window)[..., 0]
  return np.where(labels[:, :, None] != labels[:, None, :], _MASKED, 0.0).astype(np.float32)


class SwinBlock(nn.Module):
  """x + W-MSA(LN(x)) (shifted by `shift` when nonzero), then x + MLP(LN(x)), on [batch, H, W, C]."""
  num_heads: int
  window_size: int
  shift: int
  mlp_dim: int
  act: str = "gelu"
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    window, shift = self.window_size, self.shift
    if min(h, w) <= window:
      window, shift = min(h, w), 0
    y = layer_norm("norm_attention", self.dtype, self.norm_eps)(x)
    pad_h, pad_w = (-h) % window, (-w) % window
    y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    table = self.param("relative_position_bias", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(stddev=0.02), (None, "heads")), ((2 * window - 1) ** 2, self.num_heads))
    n = window * window
    bias = table[relative_position_index(window).reshape(-1)].reshape(n, n, self.num_heads).transpose(2, 0, 1)
    bias = bias[None].astype(jnp.float32)  # [1, heads, n, n]
    if shift:
      mask = jnp.asarray(shifted_window_mask(hp, wp, window, shift))[:, None]  # [windows, 1, n, n]
      bias = jnp.tile(bias + mask, (b, 1, 1, 1))  # Windows are batch-major: row i*windows + j.
    windows = window_partition(y, window)
    out = MultiHeadDotProductAttention(self.num_heads, self.dtype, self.attention_impl, name="attention")(
        windows, bias=bias)
    y = window_reverse(out, window, b, hp, wp)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    x = x + y[:, :h, :w]
    y = layer_norm("norm_mlp", self.dtype, self.norm_eps)(x)
    return x + MlpBlock(self.mlp_dim, self.act, dtype=self.dtype, name="mlp")(y)


class PatchMerging(nn.Module):
  """[batch, H, W, C] -> [batch, ceil(H/2), ceil(W/2), 2C]: 2 x 2 neighbours concatenated, LN, linear."""
  dtype: Any = jnp.float32
  norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    x = layer_norm("norm", self.dtype, self.norm_eps)(x)
    return dense(2 * c, ("mlp", "embed"), "reduction", self.dtype, use_bias=False)(x)


class Swin(nn.Module):
  """Swin image tower; `width` is the first stage's, doubled by each merge. `pool` is "gap" or "none"."""
  width: int
  depths: Sequence[int]
  num_heads: Sequence[int]
  window_size: int = 7
  patch_size: int = 4
  mlp_ratio: float = 4.0
  pool: str = "gap"
  num_classes: int | None = None
  head: str = "dense"
  act: str = "gelu"
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  norm_eps: float = 1e-5

  @property
  def features_width(self) -> int:
    return swin_output_width(self.width, self.depths)

  def num_tokens(self, image_size: int) -> int:
    """Output tokens of a square image: patches padded to whole, halved (rounding up) per merge."""
    side = -(-image_size // self.patch_size)
    for _ in self.depths[1:]:
      side = -(-side // 2)
    return side * side

  @nn.compact
  def __call__(self, image, train=False, pooled_only=False):
    """`pooled_only` is accepted as every image tower takes it; averaging reads every token."""
    del train, pooled_only  # No dropout; nothing to skip.
    if len(self.depths) != len(self.num_heads):
      raise ConfigError(f"swin depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} need one "
                        "entry per stage")
    if self.pool not in ("gap", "none"):
      raise ConfigError(f"swin pool={self.pool!r}: expected 'gap' or 'none'")
    p = self.patch_size
    image = jnp.pad(jnp.asarray(image, self.dtype),  # HF pads to whole patches; PatchEmbed would drop the rest.
                    ((0, 0), (0, -image.shape[1] % p), (0, -image.shape[2] % p), (0, 0)))
    x = PatchEmbed(self.width, p, self.dtype, name="embedding")(image)
    x = layer_norm("embedding_norm", self.dtype, self.norm_eps)(x)
    aux = {}
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      if i:
        x = PatchMerging(self.dtype, self.norm_eps, name=f"merge{i}")(x)
      for j in range(depth):
        x = SwinBlock(heads, self.window_size, 0 if j % 2 == 0 else self.window_size // 2,
                      int(self.mlp_ratio * x.shape[-1]), self.act, self.dtype, self.attention_impl, self.norm_eps,
                      name=f"stage{i}_block{j}")(x)
      aux[f"stage{i}"] = x
    x = layer_norm("norm", self.dtype, self.norm_eps)(x)
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    aux["encoded"] = tokens
    x = jnp.mean(tokens, axis=1) if self.pool == "gap" else tokens
    aux["pre_logits"] = x
    return tower_head(self, x), aux
