"""Model builders: `build(model_config)` turns a config into a linen module."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.swin import Swin, swin_output_width
from mmjax.models.text import TextTransformer
from mmjax.models.two_tower import TwoTower
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
    kw = decode_variant(tower.get("variant"))
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


def _tower_kwargs(cfg: Mapping[str, Any], side: str) -> dict[str, Any]:
  kw = resolve_tower(cfg, side)
  kw["dtype"] = jnp.dtype(kw["dtype"])
  embed_dim = cfg["embed_dim"]
  if kw.get("head") == "none" and tower_width(kw) != embed_dim:
    raise ConfigError(f"model.{side}.head='none' needs the tower's output width ({tower_width(kw)}) == "
                      f"model.embed_dim ({embed_dim})")
  kw["num_classes"] = embed_dim
  return kw


def build(model_config: Mapping[str, Any]):
  """A two-tower module from `config.model` (a ConfigDict or a plain dict)."""
  cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  if "embed_dim" not in cfg:
    raise ConfigError("model.embed_dim is required")
  image, text = _tower_kwargs(cfg, "image"), _tower_kwargs(cfg, "text")
  if "vocab_size" not in text:
    raise ConfigError("model.text.vocab_size is required")
  return TwoTower(image=image, text=text, temperature_init=float(cfg.get("temperature_init", 10.0)),
                  bias_init=cfg.get("bias_init"))


__all__ = ["build", "resolve_tower", "tower_width", "TwoTower", "ViT", "Swin", "TextTransformer", "decode_variant"]
