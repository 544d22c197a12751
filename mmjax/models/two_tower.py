"""Two-tower contrastive model (CLIP, SigLIP): image tower, text tower, shared embedding space.

Names follow big_vision's `two_towers`: `img`, `txt`, `t` (log temperature), `b` (bias).
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.data.locca import LocCaVocab
from mmjax.errors import ConfigError
from mmjax.models.locca import LocCaDecoder
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

  `locca` (dict(tokens, segments), int [images, seq] each: `mmjax.data.locca`'s packed sequences; needs the
  module's `locca`, the decoder's keys): `aux["locca/logits"]` [images, seq, vocab] of LocCa's decoder
  reading each image's patch tokens.
  `patch_tokens`: `aux["img/encoded"]` holds the image tower's output at every token. `image_mask` (bool
  [rows, patches]): those patches enter the image tower as its mask token (masked prediction).
  """
  image: dict
  text: dict
  temperature_init: float = 10.0
  bias_init: float | None = None
  locca: dict | None = None

  @nn.compact
  def __call__(self, image=None, text=None, train=False, text_packing=None, image_slot=None, locca=None,
               patch_tokens=False, image_mask=None):
    aux = {}
    zimg = ztxt = None
    if image is not None:
      mask = {} if image_mask is None else {"token_mask": image_mask}
      out, img_aux = image_tower(self.image, "img")(
          image, train=train, pooled_only=locca is None and not patch_tokens, **mask)
      aux.update({f"img/{k}": v for k, v in img_aux.items()})
      if image_slot is not None:
        out = out.reshape(-1, out.shape[-1])[image_slot]
      zimg = _l2_normalize(out)
      if locca is not None:
        if self.locca is None:
          raise ConfigError("locca: the model has no LocCa decoder (model.locca)")
        aux["locca/logits"] = LocCaDecoder(**self.locca, name="locca")(
            locca["tokens"], locca["segments"], *_image_tokens(img_aux, image, image_slot))
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


def _image_tokens(img_aux, image, image_slot):
  """`(tokens [images, n, width], centres [images, n, 2], valid bool [images, n])`: each image's encoder
  output, each token's centre in its image, and which tokens are the image's own (NaFlex: not padding;
  packed: the image's segment of its row)."""
  encoded, centres, segments = img_aux["encoded"], img_aux["centres"], img_aux.get("segments")
  if segments is None:
    return encoded, centres, jnp.ones(encoded.shape[:2], bool)
  if image_slot is None:
    return encoded, centres, segments > 0
  slots = image["grid"].shape[1]
  row = image_slot // slots
  return encoded[row], centres[row], segments[row] == (image_slot % slots + 1)[:, None]


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
                  bias_init=cfg.get("bias_init"), locca=_locca_kwargs(cfg, text["vocab_size"]))


LOCCA_KEYS = ("width", "depth", "mlp_dim", "num_heads", "max_len", "box_bins")


def _locca_kwargs(cfg: Mapping[str, Any], text_vocab: int) -> dict[str, Any] | None:
  """`model.locca` as `LocCaDecoder`'s fields (its vocabulary: the text's, the task tokens, the box
  bins), or None when the model has no decoder."""
  locca = cfg.get("locca")
  if not locca:
    return None
  missing, unknown = [k for k in LOCCA_KEYS if k not in locca], sorted(set(locca) - set(LOCCA_KEYS))
  if missing or unknown:
    raise ConfigError(f"model.locca: missing {[f'model.locca.{k}' for k in missing]}, unknown "
                      f"{[f'model.locca.{k}' for k in unknown]}; it takes {list(LOCCA_KEYS)}")
  kw = {k: locca[k] for k in LOCCA_KEYS if k != "box_bins"}
  kw["vocab_size"] = LocCaVocab(text_vocab, locca["box_bins"]).size
  kw.update(dtype=jnp.dtype(cfg.get("dtype", "float32")), attention_impl=cfg.get("attention_impl", "xla"),
            norm_eps=float(cfg.get("norm_eps", 1e-6)))
  return kw
