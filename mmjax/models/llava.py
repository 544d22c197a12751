"""LLaVA: a ViT's patch tokens, projected into the LM's width, take the places of image tokens in the text.

The forward pass, top to bottom: images [B, M, H, W, 3] -> ViT "vision" (the M images of a row
one after another) -> the tokens of block `vision_layer` (`aux["blockNN"]`; LLaVA takes the
second-to-last, -2) or the final normed ones ("encoded"), the class token dropped unless
`vision_class_token` -> "projector" (`linear`, or LLaVA-1.5's `mlp2x_gelu`: Dense -> GELU ->
Dense) -> [B, M * num_image_tokens, LM width] -> spliced into the token embeddings -> Decoder "lm".

Splicing keeps every shape static. Each image owns a run of exactly `num_image_tokens` copies of
`image_token_id` in `tokens` (`expand_image_tokens` writes them from one placeholder per image);
the k-th real (unmasked) image token of a row takes the row's k-th visual token, so images[:, 0]
fill the first run, images[:, 1] the second, and so on. With concrete tokens a row holding another
count than M * num_image_tokens raises ConfigError before anything runs. Under jit the count
cannot be checked: image tokens past M * num_image_tokens keep their own token embedding and
visual tokens left without a place are dropped. Decode steps pass `images=None` (the images were
consumed by the prefill); their tokens get plain token embeddings.

BLIP-2 (`mmjax.models.qformer`) splices its projected query outputs with the same functions.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError
from mmjax.models.decoder import Decoder, build_decoder, decoder_config
from mmjax.models.swin import Swin
from mmjax.models.two_tower import image_tower
from mmjax.models.vit import ViT, _dense

PROJECTORS = ("linear", "mlp2x_gelu")
VISION_KEYS = ("variant", "arch") + tuple(f.name for f in dataclasses.fields(ViT) if f.name not in ("parent", "name"))
# Every `model` key of a LLaVA config; None marks a required key.
LLAVA_DEFAULTS = dict(kind="llava", vision=None, lm=None, projector="mlp2x_gelu", vision_layer=-2,
                      vision_class_token=False, image_size=224, image_token_id=None, dtype="float32",
                      attention_impl="xla")


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


class Projector(nn.Module):
  """Visual tokens -> LM width: `linear` (`linear_1`) or `mlp2x_gelu` (`linear_1` -> exact GELU -> `linear_2`)."""
  width: int
  kind: str = "mlp2x_gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _dense(self.width, ("embed", "mlp"), "linear_1", self.dtype)(x)
    if self.kind == "linear":
      return x
    x = nn.gelu(x, approximate=False)
    return _dense(self.width, ("mlp", "embed"), "linear_2", self.dtype)(x)


class LLaVA(SplicedPrompt, nn.Module):
  """`(images [B, M, H, W, 3], tokens [B, L]) -> (logits [B, L, vocab] float32, aux)`; see the module docstring.

  `vision` and `lm` are submodules given unbound (`model.lm` drives `mmjax.generate.generate`
  on `prompt_embeddings`); `projector_kind` is the config's `projector`.
  """
  vision: ViT
  lm: Decoder
  image_token_id: int
  projector_kind: str = "mlp2x_gelu"
  vision_layer: int | str = -2
  vision_class_token: bool = False
  image_size: int = 224
  dtype: Any = jnp.float32

  def __post_init__(self):
    _validate(self)
    super().__post_init__()

  @property
  def num_image_tokens(self) -> int:
    """Visual tokens per image: one per patch (a Swin's last-stage tokens), plus the class token when kept."""
    if isinstance(self.vision, Swin):
      return self.vision.num_tokens(self.image_size)
    return (self.image_size // self.vision.patch_size) ** 2 + int(self.vision_class_token)

  def setup(self):
    self.projector = Projector(self.lm.width, self.projector_kind, self.dtype)

  def image_features(self, images, train=False):
    """Projected visual tokens [B, M * num_image_tokens, LM width] of images [B, M, H, W, 3], image by image."""
    batch, num_images = images.shape[:2]
    if images.shape[2:] != (self.image_size, self.image_size, 3):
      raise ConfigError(f"images of shape {images.shape[2:]}; model.image_size={self.image_size} expects "
                        f"{(self.image_size, self.image_size, 3)}")
    _, aux = self.vision(images.reshape(batch * num_images, *images.shape[2:]), train=train)
    if self.vision_layer == "encoded":
      x = aux["encoded"]
    else:
      x = aux[f"block{self.vision_layer % self.vision.depth:02d}"]
    if self.vision.pool == "tok" and not self.vision_class_token:
      x = x[:, 1:]
    x = self.projector(x).astype(self.lm.dtype)
    return x.reshape(batch, num_images * x.shape[1], x.shape[2])


def check_image_token_id(image_token_id: int, lm: Decoder):
  if not 0 <= image_token_id < lm.vocab_size:
    raise ConfigError(f"model.image_token_id={image_token_id} is outside the LM vocabulary [0, {lm.vocab_size})")


def _validate(m: LLaVA):
  check_image_token_id(m.image_token_id, m.lm)
  if m.projector_kind not in PROJECTORS:
    raise ConfigError(f"model.projector={m.projector_kind!r}; known: {list(PROJECTORS)}")
  if isinstance(m.vision, Swin):
    if m.vision_layer != "encoded" or m.vision_class_token:
      raise ConfigError(f"a Swin vision tower gives its last stage's tokens only: set model.vision_layer='encoded' "
                        f"(got {m.vision_layer!r}) and model.vision_class_token=False")
    return
  depth, layer = m.vision.depth, m.vision_layer
  if layer != "encoded":
    if isinstance(layer, bool) or not isinstance(layer, int) or not -depth <= layer < depth:
      raise ConfigError(f"model.vision_layer={layer!r}: expected a block index in [{-depth}, {depth}) or 'encoded'")
    if m.vision.scan:
      raise ConfigError(f"model.vision_layer={layer} needs per-block outputs, which a scanned ViT "
                        f"(model.vision.scan=True) does not keep; use 'encoded'")
  if m.vision_class_token and m.vision.pool != "tok":
    raise ConfigError(f"model.vision_class_token=True needs a class token: model.vision.pool='tok', "
                      f"got {m.vision.pool!r}")
  if m.image_size % m.vision.patch_size:
    raise ConfigError(f"model.image_size={m.image_size} is not a multiple of model.vision.patch_size="
                      f"{m.vision.patch_size}")


def check_keys(cfg: Mapping[str, Any], known, prefix: str) -> dict:
  """`cfg` as a plain dict; ConfigError naming every key not in `known`."""
  cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  unknown = sorted(set(cfg) - set(known))
  if unknown:
    raise ConfigError(f"unknown config key(s) {[f'{prefix}.{k}' for k in unknown]}; known: {sorted(known)}")
  return cfg


def resolve_vlm_config(model_config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
  """`model_config` over `defaults` (whose None values are required keys), unknown keys and a wrong kind rejected."""
  cfg = {**defaults, **check_keys(model_config, defaults, "model")}
  if cfg["kind"] != defaults["kind"]:
    raise ConfigError(f"model.kind={cfg['kind']!r}; this builder makes {defaults['kind']!r}")
  missing = [f"model.{k}" for k, v in cfg.items() if v is None]
  if missing:
    raise ConfigError(f"missing required config key(s) {missing}")
  return cfg


def build_vision(cfg: Mapping[str, Any]) -> ViT | Swin:
  """The ViT (or, with `arch="swin"`, the Swin) of `cfg["vision"]` (pool "none" unless set), with the
  model-wide dtype and attention_impl."""
  from mmjax.models import resolve_tower  # Here: mmjax.models may import this module's builder.
  vision = cfg["vision"].to_dict() if hasattr(cfg["vision"], "to_dict") else dict(cfg["vision"])
  if vision.get("arch", "vit") != "swin":  # A Swin's keys are checked against its fields by resolve_tower.
    vision = check_keys(vision, VISION_KEYS, "model.vision")
  vision = {"pool": "none", **vision}
  kw = resolve_tower({"vision": vision, "dtype": cfg["dtype"], "attention_impl": cfg["attention_impl"]}, "vision")
  kw["dtype"] = jnp.dtype(kw["dtype"])
  return image_tower(kw, None)


def build_lm(cfg: Mapping[str, Any]) -> Decoder:
  """The Decoder of `cfg["lm"]`; its dtype and attention_impl default to the model-wide ones."""
  lm = check_keys(cfg["lm"], decoder_config(), "model.lm")
  try:
    return build_decoder({"dtype": cfg["dtype"], "attention_impl": cfg["attention_impl"], **lm})
  except ConfigError as e:
    raise ConfigError(f"model.lm: {e}") from e


def build_llava(model_config: Mapping[str, Any]) -> LLaVA:
  """A `LLaVA` from `config.model` (keys and defaults: `LLAVA_DEFAULTS`); unknown keys raise ConfigError."""
  cfg = resolve_vlm_config(model_config, LLAVA_DEFAULTS)
  return LLaVA(vision=build_vision(cfg), lm=build_lm(cfg), image_token_id=int(cfg["image_token_id"]),
               projector_kind=cfg["projector"], vision_layer=cfg["vision_layer"],
               vision_class_token=bool(cfg["vision_class_token"]), image_size=int(cfg["image_size"]),
               dtype=jnp.dtype(cfg["dtype"]))
