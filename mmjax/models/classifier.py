"""Image classifiers: `model.kind` "perceiver_io" (`PerceiverClassifier`: pixels or patches with
Fourier position features, latents, one output query) or "vit" (`model.image`, a ViT with a dense
head to the classes). Both map NHWC images to logits [batch, num_classes]."""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.perceiver import PerceiverClassifier
from mmjax.models.towers import resolve_tower
from mmjax.models.vit import ViT

KINDS = ("perceiver_io", "vit")


class ViTClassifier(nn.Module):
  """A ViT whose dense head gives the logits."""
  tower: dict

  @nn.compact
  def __call__(self, image, train=False):
    return ViT(**self.tower, name="vit")(image, train=train, pooled_only=True)[0]


def build_classifier(cfg: Mapping[str, Any]):
  """The classifier named by `cfg["kind"]`, with `cfg["num_classes"]` outputs."""
  kind = cfg.get("kind")
  if cfg.get("num_classes") is None:
    raise ConfigError("model.num_classes is required")
  num_classes = cfg["num_classes"]
  if kind == "perceiver_io":
    missing = [f"model.{k}" for k in ("perceiver", "patch_size", "num_bands") if k not in cfg]
    if missing:
      raise ConfigError(f"missing required config key(s) {missing}")
    perceiver = dict(cfg["perceiver"])
    perceiver.update(dtype=jnp.dtype(cfg.get("dtype", "float32")), attention_impl=cfg.get("attention_impl", "xla"))
    return PerceiverClassifier(num_classes=num_classes, patch_size=cfg["patch_size"], num_bands=cfg["num_bands"],
                               perceiver=perceiver)
  if kind == "vit":
    kw = resolve_tower(cfg, "image")
    kw["dtype"] = jnp.dtype(kw["dtype"])
    kw.update(num_classes=num_classes, head="dense")
    return ViTClassifier(kw)
  raise ConfigError(f"model.kind={kind!r}: expected one of {KINDS}")
