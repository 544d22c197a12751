"""LLaVA: a ViT's patch tokens, projected into the LM's width, take the places of image tokens in the text.

The forward pass, top to bottom: images [B, M, H, W, 3] -> ViT "vision" (the M images of a row
one after another) -> the tokens of block `vision_layer` (`aux["blockNN"]`; LLaVA takes the
second-to-last, -2) or the final normed ones ("encoded"), the class token dropped unless
`vision_class_token` -> "projector" (`linear`, or LLaVA-1.5's `mlp2x_gelu`: Dense -> GELU ->
Dense) -> [B, M * num_image_tokens, LM width] -> spliced into the token embeddings -> Decoder "lm".

The splicing (`mmjax.models.vlm.SplicedPrompt`, shared with BLIP-2) keeps every shape static:
each image owns a run of exactly `num_image_tokens` copies of `image_token_id` in `tokens`.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.decoder import Decoder
from mmjax.models.layers import dense
from mmjax.models.swin import Swin
from mmjax.models.vit import ViT
from mmjax.models.vlm import SplicedPrompt, build_lm, build_vision, check_image_token_id, resolve_vlm_config

PROJECTORS = ("linear", "mlp2x_gelu")
# Every `model` key of a LLaVA config; None marks a required key.
LLAVA_DEFAULTS = dict(kind="llava", vision=None, lm=None, projector="mlp2x_gelu", vision_layer=-2,
                      vision_class_token=False, image_size=224, image_token_id=None, dtype="float32",
                      attention_impl="xla")


class Projector(nn.Module):
  """Visual tokens -> LM width: `linear` (`linear_1`) or `mlp2x_gelu` (`linear_1` -> exact GELU -> `linear_2`)."""
  width: int
  kind: str = "mlp2x_gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = dense(self.width, ("embed", "mlp"), "linear_1", self.dtype)(x)
    if self.kind == "linear":
      return x
    x = nn.gelu(x, approximate=False)
    return dense(self.width, ("mlp", "embed"), "linear_2", self.dtype)(x)


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


def build_llava(model_config: Mapping[str, Any]) -> LLaVA:
  """A `LLaVA` from `config.model` (keys and defaults: `LLAVA_DEFAULTS`); unknown keys raise ConfigError."""
  cfg = resolve_vlm_config(model_config, LLAVA_DEFAULTS)
  return LLaVA(vision=build_vision(cfg), lm=build_lm(cfg), image_token_id=int(cfg["image_token_id"]),
               projector_kind=cfg["projector"], vision_layer=cfg["vision_layer"],
               vision_class_token=bool(cfg["vision_class_token"]), image_size=int(cfg["image_size"]),
               dtype=jnp.dtype(cfg["dtype"]))
