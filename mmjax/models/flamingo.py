"""Flamingo: a frozen decoder LM reading images through gated cross-attention.

The forward pass, top to bottom:
  images [batch, media, H, W, 3] -> ViT "vision" (patch tokens, aux "encoded") -> Perceiver
  Resampler "perceiver" (num_latents tokens per image, projected to the LM's width) = visual tokens;
  tokens -> each token's media index (the count of `<image>` tokens up to and including it, minus 1)
  -> the LM "lm": embedding, then `depth` `DecoderBlock`s with a `GatedCrossAttentionBlock`
  "xattn_{i}" before every `cross_attn_every`-th one (before LM layer i, i = every-1, 2*every-1, ...),
  then final norm and output projection.
The LM is a `Decoder` used piece by piece, so `params["lm"]` has exactly a `Decoder`'s tree and a
text-only pretrained Decoder drops in; its gates start at 0, so at initialisation the logits are
the bare LM's. `end_of_chunk_id` (the `<|endofchunk|>` token closing each image's text) is kept
for tasks and generation; the forward pass treats it as ordinary text.

Cache (`init_cache`): the Decoder's KV cache (see `mmjax.models.decoder`) plus
  {"visual": [batch, max_media, num_latents, lm_width]  # visual tokens, written by the prefill
   "num_media": int32 []                                 # how many image slots the prefill filled
   "media": int32 [batch]}                               # media index of each row's last token
Give every image of a sequence with the prefill; decode steps pass `images=None`, and an
`<image>` token generated or fed later moves its row to the next cached image.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.decoder import Decoder
from mmjax.models.perceiver import PerceiverResampler
from mmjax.models.vit import ViT
from mmjax.models.vlm import build_lm, build_vision, check_keys, resolve_vlm_config
from mmjax.models.xattn import GatedCrossAttentionBlock

PERCEIVER_DEFAULTS = dict(depth=6, num_latents=64, num_heads=8, mlp_dim=None, max_media=8)  # mlp_dim None: 4*width.
XATTN_DEFAULTS = dict(num_heads=None, mlp_dim=None)  # None: the LM's num_heads, 4 * the LM's width.
DEFAULTS = dict(kind="flamingo", vision=None, lm=None, perceiver=PERCEIVER_DEFAULTS, cross_attn_every=1,
                xattn=XATTN_DEFAULTS, image_token_id=None, end_of_chunk_id=None, dtype="float32",
                attention_impl="xla")


def media_indices(tokens, image_token_id: int, mask=None, start=-1):
  """Int32 [batch, seq]: index of the image each token reads (-1: none), counting real `<image>` tokens
  up to and including it after `start` (a scalar or [batch, 1], the index before the first token)."""
  is_image = tokens == image_token_id
  if mask is not None:
    is_image &= mask
  return (start + jnp.cumsum(is_image, axis=1)).astype(jnp.int32)


class Flamingo(nn.Module):
  """`(images [batch, media, H, W, 3], tokens [batch, seq]) -> (logits float32, aux)`; see the module docstring."""
  vision: ViT
  perceiver: PerceiverResampler
  lm: Decoder
  image_token_id: int
  xattn_heads: int
  xattn_mlp_dim: int
  cross_attn_every: int = 1
  end_of_chunk_id: int | None = None
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  num_image_tokens = 1  # Each image is one `<image>` token; its visual tokens are read by cross-attention.

  def init_cache(self, batch: int, max_len: int) -> dict:
    """The LM's empty KV cache for `batch` rows of `max_len` tokens plus room for `max_media` images."""
    p = self.perceiver
    return {**self.lm.init_cache(batch, max_len),
            "visual": jnp.zeros((batch, p.max_media, p.num_latents, self.lm.width), self.dtype),
            "num_media": jnp.zeros((), jnp.int32), "media": jnp.full((batch,), -1, jnp.int32)}

  def encode_images(self, images, train=False):
    """Visual tokens [batch, media, num_latents, lm_width] of images [batch, media, H, W, 3]."""
    batch, media = images.shape[:2]
    _, aux = self.vision(jnp.reshape(images, (batch * media,) + images.shape[2:]), train=train)
    features = aux["encoded"]
    return self.perceiver(features.reshape((batch, media) + features.shape[1:]), train=train)

  @nn.compact
  def __call__(self, images, tokens, *, mask=None, cache=None, train=False):
    """Logits for every token; `images` may be None only when `cache` holds them.

    `mask` [batch, seq] marks real tokens (left padding allowed). With a `cache` the tokens
    continue it as in `Decoder.__call__`, and images given here replace the cached ones.
    aux: "hidden" (final normed states), "visual" (the visual tokens used), "cache" (updated).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
    if images is None and cache is None:
      raise ConfigError("Flamingo needs images unless a cache from a prefill with images is given")
    visual = None if images is None else self.encode_images(jnp.asarray(images), train)
    if cache is None:
      num_media, media = visual.shape[1], media_indices(tokens, self.image_token_id, mask)
    else:
      if visual is not None:
        num_media = jnp.asarray(visual.shape[1], jnp.int32)
        visual = jnp.zeros_like(cache["visual"]).at[:, :visual.shape[1]].set(visual.astype(cache["visual"].dtype))
      else:
        num_media, visual = cache["num_media"], cache["visual"]
      media = media_indices(tokens, self.image_token_id, mask, cache["media"][:, None])
    readable = jnp.where(media < num_media, media, -1)

    x, block_kw, state = self.lm.prepare(tokens, mask=mask, cache=cache, train=train)
    layer_caches = state["layer_caches"]
    for i in range(self.lm.depth):
      if i % self.cross_attn_every == self.cross_attn_every - 1:
        x = GatedCrossAttentionBlock(self.xattn_heads, self.xattn_mlp_dim, self.dtype, self.attention_impl,
                                     name=f"xattn_{i}")(x, visual, readable, train)
      x, layer_caches[i] = self.lm.run_block(i, x, block_kw, layer_caches[i], train)
    logits, aux = self.lm.finish(x, block_kw, state, cache)
    aux["visual"] = visual
    if cache is not None:
      aux["cache"].update(visual=visual, num_media=num_media, media=media[:, -1])
    return logits, aux


def build_flamingo(model_cfg: Mapping[str, Any]) -> Flamingo:
  """A `Flamingo` from `config.model` (dict or ConfigDict); unknown keys raise ConfigError naming them.

  Keys (defaults in `DEFAULTS`): vision (ViT keys; `pool` defaults to "none"), lm (`decoder_config`
  keys; dtype and attention_impl default to the model's), perceiver (depth, num_latents, num_heads,
  mlp_dim, max_media), cross_attn_every, xattn (num_heads, mlp_dim), image_token_id (required),
  end_of_chunk_id, dtype, attention_impl.
  """
  cfg = resolve_vlm_config(model_cfg, DEFAULTS, optional=("end_of_chunk_id",))
  if int(cfg["cross_attn_every"]) < 1:
    raise ConfigError(f"model.cross_attn_every={cfg['cross_attn_every']} must be >= 1")
  vision, lm = build_vision(cfg), build_lm(cfg)
  perceiver = {**PERCEIVER_DEFAULTS, **check_keys(cfg["perceiver"], PERCEIVER_DEFAULTS, "model.perceiver")}
  xattn = {**XATTN_DEFAULTS, **check_keys(cfg["xattn"], XATTN_DEFAULTS, "model.xattn")}
  dtype = jnp.dtype(cfg["dtype"])
  return Flamingo(
      vision=vision,
      perceiver=PerceiverResampler(
          perceiver["depth"], perceiver["num_latents"], perceiver["num_heads"],
          perceiver["mlp_dim"] or 4 * vision.features_width, perceiver["max_media"], lm.width, dtype,
          cfg["attention_impl"]),
      lm=lm, image_token_id=int(cfg["image_token_id"]), end_of_chunk_id=cfg["end_of_chunk_id"],
      cross_attn_every=int(cfg["cross_attn_every"]), xattn_heads=xattn["num_heads"] or lm.num_heads,
      xattn_mlp_dim=xattn["mlp_dim"] or 4 * lm.width, dtype=dtype, attention_impl=cfg["attention_impl"])
