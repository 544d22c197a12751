"""Model builders: `build(model_config)` turns a config into a linen module."""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.text import TextTransformer
from mmjax.models.two_tower import TwoTower
from mmjax.models.vit import ViT, decode_variant

_TOWER_SHAPE_KEYS = ("width", "depth", "mlp_dim", "num_heads")
_SHARED_KEYS = ("dtype", "attention_impl", "norm_eps")


def _tower_kwargs(tower: Mapping[str, Any], shared: Mapping[str, Any], embed_dim, prefix: str):
  """Variant defaults, then explicit (non-None) keys; the config's None means 'from the variant'."""
  kw = decode_variant(tower.get("variant"))
  kw.update({k: v for k, v in tower.items() if k != "variant" and v is not None})
  missing = [k for k in _TOWER_SHAPE_KEYS if k not in kw]
  if missing:
    raise ConfigError(f"{prefix}: set `variant` or all of {list(_TOWER_SHAPE_KEYS)}; "
                      f"missing {[f'{prefix}.{k}' for k in missing]}")
  for k in _SHARED_KEYS:
    kw.setdefault(k, shared[k])
  kw["dtype"] = jnp.dtype(kw["dtype"])
  if kw.get("head") == "none" and kw["width"] != embed_dim:
    raise ConfigError(f"{prefix}.head='none' needs {prefix}.width ({kw['width']}) == model.embed_dim ({embed_dim})")
  kw["num_classes"] = embed_dim
  return kw


def build(model_config: Mapping[str, Any]):
  """A two-tower module from `config.model` (a ConfigDict or a plain dict)."""
  cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  shared = {"dtype": cfg.get("dtype", "float32"), "attention_impl": cfg.get("attention_impl", "xla"),
            "norm_eps": float(cfg.get("norm_eps", 1e-6))}
  for key in ("image", "text", "embed_dim"):
    if key not in cfg:
      raise ConfigError(f"model.{key} is required")
  image = _tower_kwargs(cfg["image"], shared, cfg["embed_dim"], "model.image")
  text = _tower_kwargs(cfg["text"], shared, cfg["embed_dim"], "model.text")
  if "vocab_size" not in text:
    raise ConfigError("model.text.vocab_size is required")
  return TwoTower(image=image, text=text, temperature_init=float(cfg.get("temperature_init", 10.0)),
                  bias_init=cfg.get("bias_init"))


__all__ = ["build", "TwoTower", "ViT", "TextTransformer", "decode_variant"]
