"""BLIP-2: a Q-Former's learned queries read a (frozen) ViT's tokens; projected, they take the places of image tokens.

The forward pass, top to bottom: images [B, M, H, W, 3] -> ViT "vision" (the M images of a row
one after another) -> its final normed tokens (`aux["encoded"]`, class token included when the
ViT has one) -> Q-Former "qformer": `num_queries` learned queries through `depth` layers of
self-attention among the queries, cross-attention from the queries to the image tokens and a
GELU MLP -> [B * M, num_queries, width] -> "projector" (one Dense into the LM width) -> spliced
over runs of `num_queries` image tokens exactly as in LLaVA (`mmjax.models.vlm.SplicedPrompt`)
-> Decoder "lm".

Choices that differ from BLIP-2's BERT-based Q-Former: the layers are pre-norm, x + f(LN(x)),
with a final LayerNorm (BERT is post-norm), like every other transformer in mmjax; there is no
text branch (BLIP-2's stage-1 ITC/ITM objectives), so the queries never see the text. As in
BLIP-2 (`cross_attention_freq`), layer i cross-attends when i % cross_attention_every == 0.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.decoder import Decoder
from mmjax.models.layers import ACT_AXES, MlpBlock, MultiHeadDotProductAttention, dense, layer_norm
from mmjax.models.vit import ViT
from mmjax.models.vlm import (SplicedPrompt, build_lm, build_vision, check_image_token_id, check_keys,
                              resolve_vlm_config)
from mmjax.ops.attention import dot_product_attention

# Every `model` key of a BLIP-2 config; None marks a required key. `qformer` keys: QFORMER_KEYS.
BLIP2_DEFAULTS = dict(kind="blip2", vision=None, lm=None, qformer={}, image_token_id=None, dtype="float32",
                      attention_impl="xla")
QFORMER_KEYS = ("depth", "num_queries", "width", "num_heads", "mlp_dim", "cross_attention_every")


class CrossAttention(nn.Module):
  """Multi-head attention from queries [B, Q, width] to image tokens [B, N, kv_width] of another width.

  Parameters laid out as `layers.MultiHeadDotProductAttention`'s (`query/key/value/out`), whose key
  and value projections take inputs of the query's width only.
  """
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, kv):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    qkv_init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))

    def proj(name, inputs):
      return nn.Einsum((inputs.shape[-1], self.num_heads, head_dim), "bld,dhk->blhk", dtype=self.dtype, name=name,
                       kernel_init=nn.with_logical_partitioning(qkv_init, ("embed", "heads", "kv")),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")))(inputs)

    y = dot_product_attention(proj("query", x), proj("key", kv), proj("value", kv), impl=self.attention_impl)
    out_init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
    return nn.Einsum((self.num_heads, head_dim, width), "blhk,hkd->bld", dtype=self.dtype, name="out",
                     kernel_init=nn.with_logical_partitioning(out_init, ("heads", "kv", "embed")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(y)


class QFormerLayer(nn.Module):
  """Pre-norm: x + self_attention(LN(x)), [x + cross_attention(LN(x), image)], x + mlp(LN(x))."""
  num_heads: int
  mlp_dim: int
  cross_attention: bool
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, image):
    y = layer_norm("self_attention_norm", self.dtype, self.norm_eps)(x)
    x = x + MultiHeadDotProductAttention(self.num_heads, self.dtype, self.attention_impl, name="self_attention")(y)
    if self.cross_attention:
      y = layer_norm("cross_attention_norm", self.dtype, self.norm_eps)(x)
      x = x + CrossAttention(self.num_heads, self.dtype, self.attention_impl, name="cross_attention")(y, image)
    y = layer_norm("mlp_norm", self.dtype, self.norm_eps)(x)
    x = x + MlpBlock(self.mlp_dim, "gelu", dtype=self.dtype, name="mlp")(y)
    return nn.with_logical_constraint(x, ACT_AXES)


class QFormer(nn.Module):
  """`(image tokens [B, N, D]) -> query outputs [B, num_queries, width]`; layers `layers_0`, ..., `final_norm`."""
  depth: int = 12
  num_queries: int = 32
  width: int = 768
  num_heads: int = 12
  mlp_dim: int = 3072
  cross_attention_every: int = 2
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  norm_eps: float = 1e-6

  def __post_init__(self):
    for key in ("depth", "num_queries", "num_heads", "mlp_dim", "cross_attention_every"):
      if getattr(self, key) < 1:
        raise ConfigError(f"model.qformer.{key}={getattr(self, key)} must be >= 1")
    if self.width % self.num_heads:
      raise ConfigError(f"model.qformer.width={self.width} is not divisible by model.qformer.num_heads="
                        f"{self.num_heads}")
    super().__post_init__()

  @nn.compact
  def __call__(self, image):
    queries = self.param("queries", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                                 (None, "embed")), (self.num_queries, self.width))
    x = jnp.broadcast_to(queries.astype(self.dtype), (image.shape[0], self.num_queries, self.width))
    image = image.astype(self.dtype)
    for i in range(self.depth):
      x = QFormerLayer(self.num_heads, self.mlp_dim, i % self.cross_attention_every == 0, self.dtype,
                       self.attention_impl, self.norm_eps, name=f"layers_{i}")(x, image)
    return layer_norm("final_norm", self.dtype, self.norm_eps)(x)


class BLIP2(SplicedPrompt, nn.Module):
  """`(images [B, M, H, W, 3], tokens [B, L]) -> (logits [B, L, vocab] float32, aux)`; see the module docstring.

  `vision`, `qformer` and `lm` are submodules given unbound (`model.lm` drives
  `mmjax.generate.generate` on `prompt_embeddings`).
  """
  vision: ViT
  qformer: QFormer
  lm: Decoder
  image_token_id: int
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_image_token_id(self.image_token_id, self.lm)
    super().__post_init__()

  @property
  def num_image_tokens(self) -> int:
    """Visual tokens per image: the Q-Former's queries."""
    return self.qformer.num_queries

  def setup(self):
    self.projector = dense(self.lm.width, ("embed", "mlp"), None, self.dtype)

  def image_features(self, images, train=False):
    """Projected query outputs [B, M * num_queries, LM width] of images [B, M, H, W, 3], image by image."""
    batch, num_images = images.shape[:2]
    _, aux = self.vision(images.reshape(batch * num_images, *images.shape[2:]), train=train)
    x = self.projector(self.qformer(aux["encoded"])).astype(self.lm.dtype)
    return x.reshape(batch, num_images * x.shape[1], x.shape[2])


def build_blip2(model_config: Mapping[str, Any]) -> BLIP2:
  """A `BLIP2` from `config.model` (keys: `BLIP2_DEFAULTS`, `qformer` keys: `QFORMER_KEYS` with `QFormer`'s
  defaults); unknown keys raise ConfigError."""
  cfg = resolve_vlm_config(model_config, BLIP2_DEFAULTS)
  qformer = check_keys(cfg["qformer"], QFORMER_KEYS, "model.qformer")
  dtype = jnp.dtype(cfg["dtype"])
  return BLIP2(vision=build_vision(cfg), qformer=QFormer(**qformer, dtype=dtype, attention_impl=cfg["attention_impl"]),
               lm=build_lm(cfg), image_token_id=int(cfg["image_token_id"]), dtype=dtype)
