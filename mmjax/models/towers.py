"""Encoder towers from config: a tower's keys resolved (variant expanded, model-wide keys filled in),
and the image tower they describe, a ViT or a Swin."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mmjax.errors import ConfigError
from mmjax.models.swin import Swin, swin_output_width
from mmjax.models.vit import ViT, decode_variant

_TOWER_SHAPE_KEYS = ("width", "depth", "mlp_dim", "num_heads")
# Model-wide keys a tower may override.
_SHARED_DEFAULTS = {"dtype": "float32", "attention_impl": "xla", "norm_eps": 1e-6}


def resolve_tower(model_config: Mapping[str, Any], side: str) -> dict[str, Any]:
  """`model.<side>` with its variant expanded and the model-wide keys (dtype, attention_impl,
  norm_eps) filled in; the config's None means 'from the variant'."""
  prefix = f"model.{side}"
  if side not in model_config:
    raise ConfigError(f"{prefix} is required")
  tower = model_config[side]
  if tower.get("arch", "vit") == "swin":
    kw = _swin_keys(tower, prefix)
  else:
    variant = tower.get("variant")
    kw = decode_variant(variant)
    if side == "text" and "patch_size" in kw:
      raise ConfigError(f"{prefix}.variant={variant!r}: a text tower has no patches; give its size alone "
                        f"({variant.partition('/')[0]!r})")
    kw.update({k: v for k, v in tower.items() if k not in ("variant", "arch") and v is not None})
    missing = [k for k in _TOWER_SHAPE_KEYS if k not in kw]
    if missing:
      raise ConfigError(f"{prefix}: set `variant` or all of {list(_TOWER_SHAPE_KEYS)}; "
                        f"missing {[f'{prefix}.{k}' for k in missing]}")
  for k, default in _SHARED_DEFAULTS.items():
    kw.setdefault(k, model_config.get(k, default))
  kw["norm_eps"] = float(kw["norm_eps"])
  return kw


def _swin_keys(tower, prefix: str) -> dict[str, Any]:
  """A Swin tower's keys (`arch="swin"`), each one a field of `Swin`."""
  fields = {f.name for f in dataclasses.fields(Swin)} - {"parent", "name"}
  kw = {k: v for k, v in tower.items() if k != "arch" and v is not None}
  unknown = sorted(set(kw) - fields)
  missing = [k for k in ("width", "depths", "num_heads") if k not in kw]
  if unknown or missing:
    raise ConfigError(f"{prefix} (arch='swin'): unknown keys {[f'{prefix}.{k}' for k in unknown]}, missing "
                      f"{[f'{prefix}.{k}' for k in missing]}; Swin takes {sorted(fields)}")
  return {**kw, "arch": "swin"}


def tower_width(kw: Mapping[str, Any]) -> int:
  """The width of a resolved tower's features: a Swin's last stage doubles its width per merge."""
  if kw.get("arch") == "swin":
    return swin_output_width(kw["width"], kw["depths"])
  return kw["width"]


def image_tower(kw: dict, name: str | None):
  """The image tower of a resolved tower config: a ViT, or a Swin when `arch` is "swin"."""
  kw = dict(kw)
  arch = kw.pop("arch", "vit")
  if arch not in ("vit", "swin"):
    raise ConfigError(f"model.image.arch={arch!r}: expected 'vit' or 'swin'")
  return (Swin if arch == "swin" else ViT)(**kw, name=name)
