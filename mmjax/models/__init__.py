"""Model builders: `build(model_config)` turns a config into a linen module."""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from mmjax.errors import ConfigError
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
  kw = decode_variant(tower.get("variant"))
  kw.update({k: v for k, v in tower.items() if k != "variant" and v is not None})
  missing = [k for k in _TOWER_SHAPE_KEYS if k not in kw]
  if missing:
    raise ConfigError(f"{prefix}: set `variant` or all of {list(_TOWER_SHAPE_KEYS)}; "
                      f"missing {[f'{prefix}.{k}' for k in missing]}")
  for k, default in _SHARED_DEFAULTS.items():
    kw.setdefault(k, model_config.get(k, default))
  kw["norm_eps"] = float(kw["norm_eps"])
  return kw


def _tower_kwargs(cfg: Mapping[str, Any], side: str) -> dict[str, Any]:
  kw = resolve_tower(cfg, side)
  kw["dtype"] = jnp.dtype(kw["dtype"])
  embed_dim = cfg["embed_dim"]
  if kw.get("head") == "none" and kw["width"] != embed_dim:
    raise ConfigError(f"model.{side}.head='none' needs model.{side}.width ({kw['width']}) == "
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


__all__ = ["build", "resolve_tower", "TwoTower", "ViT", "TextTransformer", "decode_variant"]
