"""LocCa's decoder (SigLIP 2's captioning loss): a small transformer decoder over the image tower's
patch features, trained alongside the contrastive loss and dropped from the export.

Each block: causal self-attention within each of a row's packed sequences (`segments`), cross-attention
to the image's valid patch tokens, then an MLP, all pre-LN. Positions restart with each sequence. The
image tokens carry where they are: Fourier features of each patch's centre in its image (the
fractions the box tokens quantise) are projected and added to them. The image tokens are projected to the decoder's width and
normalised once (`img_proj`, `img_norm`). Token ids follow `mmjax.data.locca.LocCaVocab`; the output
projection is tied to the token embedding.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import ACT_AXES, MlpBlock, MultiHeadDotProductAttention, dense, layer_norm
from mmjax.models.text import TokenEmbed


FOURIER_BANDS = 6  # sin and cos of pi * 2^k times a patch centre: the finest has a period of 1/16 of the image.


class LocCaBlock(nn.Module):
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, segments, image, image_mask):
    def attention(name):
      return MultiHeadDotProductAttention(self.num_heads, self.dtype, self.attention_impl, name=name)

    y = layer_norm("self_attention_norm", self.dtype, self.norm_eps)(x)
    x = x + attention("self_attention")(y, causal=True, q_segment_ids=segments, kv_segment_ids=segments)
    y = layer_norm("cross_attention_norm", self.dtype, self.norm_eps)(x)
    x = x + attention("cross_attention")(y, image, mask=image_mask[:, None, None, :])
    y = layer_norm("mlp_norm", self.dtype, self.norm_eps)(x)
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(y)
    return nn.with_logical_constraint(x, ACT_AXES)


class LocCaDecoder(nn.Module):
  """`(tokens int [batch, seq], segments int [batch, seq], image tokens [batch, n, image width], their
  centres [batch, n, 2] (y, x fractions of the image), image_mask bool [batch, n]) -> logits float32
  [batch, seq, vocab_size]`; position i predicts token i + 1 of its sequence (the tokens of one segment id)."""
  vocab_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  max_len: int
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, tokens, segments, image, centres, image_mask):
    embed = TokenEmbed(self.vocab_size, self.width, dtype=self.dtype, name="embed",
                       embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                                   ("vocab", "embed")))
    pos = self.param("pos_embedding", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                                   (None, None, "embed")), (1, self.max_len, self.width))
    index = jnp.arange(tokens.shape[1])
    starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    positions = index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    x = embed(tokens) + pos[0, positions].astype(self.dtype)
    image = dense(self.width, (None, "embed"), "img_proj", self.dtype)(image.astype(self.dtype))
    angles = centres.astype(jnp.float32)[..., None] * jnp.pi * 2.0 ** jnp.arange(FOURIER_BANDS)  # [b, n, 2, bands]
    fourier = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*centres.shape[:2], -1)
    image = image + dense(self.width, (None, "embed"), "centre_proj", self.dtype)(fourier.astype(self.dtype))
    image = layer_norm("img_norm", self.dtype, self.norm_eps)(image)
    for i in range(self.depth):
      x = LocCaBlock(self.mlp_dim, self.num_heads, self.dtype, self.attention_impl, self.norm_eps,
                     name=f"block_{i}")(x, segments, image, image_mask)
    x = layer_norm("final_norm", self.dtype, self.norm_eps)(x)
    return embed.attend(x).astype(jnp.float32)
