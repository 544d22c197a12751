"""Model builders: `build(model_config)` turns a config into a linen module, by its `kind`.

Kinds: none or "two_tower" (`TwoTower`: CLIP, SigLIP), "lm" (a text-only `Decoder`), the
vision-language models "llava", "flamingo" and "blip2" (`mmjax.models.vlm`), the image
classifiers "perceiver_io" and "vit" (`mmjax.models.classifier`) and "fusion" (an image-and-text
classifier, `mmjax.models.fusion`). A task's `model_config` is such a config, with the ids its
tokenizer decides (vocabulary size, media token ids) filled in.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn

from mmjax.config import as_dict
from mmjax.errors import ConfigError
from mmjax.models.classifier import KINDS as CLASSIFIER_KINDS
from mmjax.models.classifier import build_classifier
from mmjax.models.decoder import build_decoder
from mmjax.models.flamingo import build_flamingo
from mmjax.models.fusion import build_fusion
from mmjax.models.llava import build_llava
from mmjax.models.qformer import build_blip2
from mmjax.models.swin import Swin
from mmjax.models.text import TextTransformer
from mmjax.models.towers import resolve_tower, tower_width
from mmjax.models.two_tower import TwoTower, build_two_tower
from mmjax.models.vit import ViT, decode_variant


def _build_lm(cfg: Mapping[str, Any]):
  return build_decoder({k: v for k, v in cfg.items() if k != "kind"})


BUILDERS = {"two_tower": build_two_tower, "lm": _build_lm, "llava": build_llava, "flamingo": build_flamingo,
            "blip2": build_blip2, "fusion": build_fusion, **{kind: build_classifier for kind in CLASSIFIER_KINDS}}


def build(model_config: Mapping[str, Any]) -> nn.Module:
  """The module of `model_config` (a ConfigDict or a plain dict, such as a task's `model_config`)
  by its `kind` (none: "two_tower"). Its `adapt` entry, an adapted run's adaptation, is left to
  `mmjax.adapt.wrap`: the module built here is the unadapted model."""
  cfg = {k: v for k, v in as_dict(model_config).items() if k != "adapt"}
  kind = cfg.get("kind") or "two_tower"
  if kind not in BUILDERS:
    raise ConfigError(f"model.kind={kind!r}; known: {sorted(BUILDERS)}")
  return BUILDERS[kind](cfg)


__all__ = ["BUILDERS", "build", "resolve_tower", "tower_width", "TwoTower", "ViT", "Swin", "TextTransformer",
           "decode_variant"]
