"""What the vision-language models (Flamingo, LLaVA and BLIP-2) share: one interface, their config
checks, the vision and LM builders, and the splicing of visual tokens into the prompt.

Each is built from `config.model` (`kind` plus its own keys) and is called as
`model.apply(v, images [B, M, H, W, 3] or None, tokens [B, L], mask=, cache=, train=)`
-> `(logits [B, L, vocab], aux)`, with `init_cache(batch, max_len)` for generation
(`mmjax.generate.generate(..., images=)`). The vision tower is named "vision" and the
language model "lm" (a `Decoder`'s parameter tree), so freezing and `init_from` work by name.
In the token sequence, each image is `model.num_image_tokens` copies of `model.image_token_id`.

Splicing (LLaVA and BLIP-2, `SplicedPrompt`) keeps every shape static. Each image owns a run of
exactly `num_image_tokens` image tokens in `tokens` (`expand_image_tokens` writes them from one
placeholder per image); the k-th real (unmasked) image token of a row takes the row's k-th visual
token, so images[:, 0] fill the first run, images[:, 1] the second, and so on. With concrete
tokens a row holding another count than M * num_image_tokens raises ConfigError before anything
runs. Under jit the count cannot be checked: image tokens past M * num_image_tokens keep their own
token embedding and visual tokens left without a place are dropped. Decode steps pass
`images=None` (the images were consumed by the prefill); their tokens get plain token embeddings.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import as_dict
from mmjax.errors import ConfigError
from mmjax.models.decoder import DECODER_KEYS, Decoder, build_decoder
from mmjax.models.swin import Swin
from mmjax.models.towers import image_tower, resolve_tower
from mmjax.models.vit import ViT

VISION_KEYS = ("variant", "arch") + tuple(f.name for f in dataclasses.fields(ViT) if f.name not in ("parent", "name"))


def check_keys(cfg: Mapping[str, Any], known, prefix: str) -> dict:
  """`cfg` as a plain dict; ConfigError naming every key not in `known`."""
  cfg = as_dict(cfg)
  unknown = sorted(set(cfg) - set(known))
  if unknown:
    raise ConfigError(f"unknown config key(s) {[f'{prefix}.{k}' for k in unknown]}; known: {sorted(known)}")
  return cfg


def resolve_vlm_config(model_config: Mapping[str, Any], defaults: Mapping[str, Any], optional=()) -> dict:
  """`model_config` over `defaults` (whose None values are required keys, except those named in
  `optional`), unknown keys and a wrong kind rejected."""
  cfg = {**defaults, **check_keys(model_config, defaults, "model")}
  if cfg["kind"] != defaults["kind"]:
    raise ConfigError(f"model.kind={cfg['kind']!r}; this builder makes {defaults['kind']!r}")
  missing = [f"model.{k}" for k, v in cfg.items() if v is None and k not in optional]
  if missing:
    raise ConfigError(f"missing required config key(s) {missing}")
  return cfg


def build_vision(cfg: Mapping[str, Any]) -> ViT | Swin:
  """The ViT (or, with `arch="swin"`, the Swin) of `cfg["vision"]` (pool "none" unless set), with the
  model-wide dtype and attention_impl."""
  vision = as_dict(cfg["vision"])
  if vision.get("arch", "vit") != "swin":  # A Swin's keys are checked against its fields by resolve_tower.
    vision = check_keys(vision, VISION_KEYS, "model.vision")
  vision = {"pool": "none", **vision}
  kw = resolve_tower({"vision": vision, "dtype": cfg["dtype"], "attention_impl": cfg["attention_impl"]}, "vision")
  kw["dtype"] = jnp.dtype(kw["dtype"])
  return image_tower(kw, None)


def build_lm(cfg: Mapping[str, Any]) -> Decoder:
  """The Decoder of `cfg["lm"]`; its dtype and attention_impl default to the model-wide ones."""
  lm = check_keys(cfg["lm"], DECODER_KEYS, "model.lm")
  try:
    return build_decoder({"dtype": cfg["dtype"], "attention_impl": cfg["attention_impl"], **lm})
  except ConfigError as e:
    raise ConfigError(f"model.lm: {e}") from e


def check_image_token_id(image_token_id: int, lm: Decoder):
  if not 0 <= image_token_id < lm.vocab_size:
    raise ConfigError(f"model.image_token_id={image_token_id} is outside the LM vocabulary [0, {lm.vocab_size})")


def expand_image_tokens(token_lists: Sequence[Sequence[int]], image_token_id: int, n: int) -> list[list[int]]:
  """Each `image_token_id` placeholder of each token list replaced by a run of `n` copies (one run per image)."""
  return [[int(t) for token in tokens for t in ([token] * n if token == image_token_id else [token])]
          for tokens in token_lists]


def check_image_token_count(tokens, mask, image_token_id: int, expected: int):
  """ConfigError naming the rows whose count of real image tokens is not `expected`; no check on traced values."""
  if isinstance(tokens, jax.core.Tracer) or isinstance(mask, jax.core.Tracer):
    return
  counts = ((np.asarray(tokens) == image_token_id) & np.asarray(mask)).sum(axis=1)
  bad = np.nonzero(counts != expected)[0]
  if bad.size:
    raise ConfigError(f"token rows {bad.tolist()} hold {counts[bad].tolist()} image tokens (model.image_token_id="
                      f"{image_token_id}); expected {expected} = images per row x num_image_tokens "
                      f"(use expand_image_tokens)")


def splice_image_tokens(embeds, tokens, mask, visual, image_token_id: int):
  """`embeds` [B, L, D] with the real image-token positions of each row taking `visual` [B, K, D] in order."""
  is_image = (tokens == image_token_id) & mask
  index = jnp.cumsum(is_image, axis=1) - 1
  picked = jnp.take_along_axis(visual, jnp.clip(index, 0, visual.shape[1] - 1)[..., None], axis=1)
  return jnp.where((is_image & (index < visual.shape[1]))[..., None], picked.astype(embeds.dtype), embeds)


class SplicedPrompt:
  """What LLaVA and BLIP-2 share: a model with `lm` (a Decoder), `image_token_id`,
  `num_image_tokens` and `image_features(images, train)` whose features overwrite the image
  tokens of the LM's input embeddings."""

  def init_cache(self, batch: int, max_len: int) -> dict:
    """The LM's KV cache (`mmjax.models.decoder`) for `max_len` tokens, image tokens included."""
    return self.lm.init_cache(batch, max_len)

  def prompt_embeddings(self, images, tokens, mask=None, train=False):
    """The LM's `inputs_embeds` [B, L, width]: token embeddings, image tokens replaced by visual features."""
    if images is not None and images.ndim != 5:
      raise ConfigError(f"images of shape {images.shape}; expected [batch, images per row, height, width, 3]")
    mask = jnp.ones(jnp.shape(tokens), bool) if mask is None else jnp.asarray(mask, bool)
    num_images = 0 if images is None else images.shape[1]
    check_image_token_count(tokens, mask, self.image_token_id, num_images * self.num_image_tokens)
    tokens = jnp.asarray(tokens, jnp.int32)
    x = self.lm.embed(tokens)
    if images is None:
      return x
    return splice_image_tokens(x, tokens, mask, self.image_features(images, train=train), self.image_token_id)

  def __call__(self, images, tokens, *, mask=None, cache=None, train=False):
    x = self.prompt_embeddings(images, tokens, mask, train)
    return self.lm(None, mask=mask, cache=cache, inputs_embeds=x, train=train)
