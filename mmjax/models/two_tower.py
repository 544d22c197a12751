"""Two-tower contrastive model (CLIP, SigLIP): image tower, text tower, shared embedding space.

Names follow big_vision's `two_towers`: `img`, `txt`, `t` (log temperature), `b` (bias).
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError
from mmjax.models.text import TextTransformer
from mmjax.models.towers import image_tower, resolve_tower, tower_width


def _l2_normalize(x, eps=1e-8):
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class TwoTower(nn.Module):
  """`apply({"params": p}, image=..., text=...) -> (zimg, ztxt, aux)`; either input may be None.

  `zimg`/`ztxt` are L2-normalised float32 embeddings; `aux["t"]` is the positive logit
  scale exp(t) and `aux["b"]` the logit bias (absent when `bias_init` is None).

  `text_packing` (`positions`, `segments`, `pool` and `slot` of a batch whose `text` is packed
  by `mmjax.data.packing`): `ztxt` is still one embedding per caption, in the batch's order;
  the `txt/...` aux entries keep the packed layout ([rows, k, ...]). Likewise `image_slot` for NaFlex
  images packed by `mmjax.data.packing.pack_images`.
  """
  image: dict
  text: dict
  temperature_init: float = 10.0
  bias_init: float | None = None

  @nn.compact
  def __call__(self, image=None, text=None, train=False, text_packing=None, image_slot=None):
    aux = {}
    zimg = ztxt = None
    if image is not None:
      out, img_aux = image_tower(self.image, "img")(image, train=train, pooled_only=True)
      aux.update({f"img/{k}": v for k, v in img_aux.items()})
      if image_slot is not None:
        out = out.reshape(-1, out.shape[-1])[image_slot]
      zimg = _l2_normalize(out)
    if text is not None:
      out, txt_aux = TextTransformer(**self.text, name="txt")(text, train=train, pooled_only=True,
                                                              packing=text_packing)
      aux.update({f"txt/{k}": v for k, v in txt_aux.items()})
      if text_packing is not None:
        out = out.reshape(-1, out.shape[-1])[text_packing["slot"]]
      ztxt = _l2_normalize(out)
    t = self.param("t", nn.with_logical_partitioning(nn.initializers.constant(np.log(self.temperature_init)),
                                                     (None,)), (1,))
    aux["t"] = jnp.exp(t[0])
    if self.bias_init is not None:
      b = self.param("b", nn.with_logical_partitioning(nn.initializers.constant(self.bias_init), (None,)), (1,))
      aux["b"] = b[0]
    return zimg, ztxt, aux


def _tower_kwargs(cfg: Mapping[str, Any], side: str) -> dict[str, Any]:
  kw = resolve_tower(cfg, side)
  kw["dtype"] = jnp.dtype(kw["dtype"])
  embed_dim = cfg["embed_dim"]
  if kw.get("head") == "none" and tower_width(kw) != embed_dim:
    raise ConfigError(f"model.{side}.head='none' needs the tower's output width ({tower_width(kw)}) == "
                      f"model.embed_dim ({embed_dim})")
  kw["num_classes"] = embed_dim
  return kw


def build_two_tower(cfg: Mapping[str, Any]) -> TwoTower:
  """A `TwoTower` from a model config: `image` and `text` towers, `embed_dim`, `temperature_init`, `bias_init`."""
  if "embed_dim" not in cfg:
    raise ConfigError("model.embed_dim is required")
  image, text = _tower_kwargs(cfg, "image"), _tower_kwargs(cfg, "text")
  if "vocab_size" not in text:
    raise ConfigError("model.text.vocab_size is required")
  return TwoTower(image=image, text=text, temperature_init=float(cfg.get("temperature_init", 10.0)),
                  bias_init=cfg.get("bias_init"))
