"""big_vision SigLIP and SigLIP 2 `.npz` checkpoints -> mmjax; the model config is inferred from the shapes.

mmjax's two-tower parameter names are big_vision's (`img/Transformer/encoderblock_0/...`,
`txt/Encoder_0/...`, `img/MAPHead_0/...`, `t`, `b`), so the arrays map one to one; scanned
checkpoints (`encoderblock` with a leading layer axis, as in So400m) load into a scanned model.
A NaFlex image tower (big_vision's `naflex_vit`: a Dense `embedding` over flattened patches and a
[G, G, width] `pos_embedding`) becomes `model.image.naflex`, its two arrays reshaped.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np

from mmjax.errors import ConversionError
from mmjax.interop import common


def _tower(flat: dict, prefix: str, encoder: str, side: str) -> dict:
  """Width, depth, MLP width, heads and scan of one tower, from its parameter shapes."""
  blocks = sorted({int(m.group(1)) for k in flat if (m := re.match(rf"{prefix}/{encoder}/encoderblock_(\d+)/", k))})
  scanned = any(k.startswith(f"{prefix}/{encoder}/encoderblock/") for k in flat)
  if not blocks and not scanned:
    raise ConversionError(f"{side}: no {prefix}/{encoder}/encoderblock_N or scanned encoderblock parameters")
  block = f"{prefix}/{encoder}/encoderblock" + ("" if scanned else "_0")
  query = flat.get(f"{block}/MultiHeadDotProductAttention_0/query/kernel")
  mlp = flat.get(f"{block}/MlpBlock_0/Dense_0/kernel")
  if query is None or mlp is None:
    raise ConversionError(f"{side}: missing {block}/MultiHeadDotProductAttention_0/query/kernel or "
                          f"{block}/MlpBlock_0/Dense_0/kernel")
  query, mlp = query.shape[scanned:], mlp.shape[scanned:]
  depth = flat[f"{block}/LayerNorm_0/scale"].shape[0] if scanned else len(blocks)
  pool = "map" if any(k.startswith(f"{prefix}/MAPHead_0/") for k in flat) else None
  head = "dense" if f"{prefix}/head/kernel" in flat else "none"
  return dict(width=query[0], depth=depth, mlp_dim=mlp[1], num_heads=query[1], scan=scanned, head=head,
              act="gelu_tanh", **({"pool": pool} if pool else {}))


def _is_naflex(flat: dict) -> bool:
  return flat["img/embedding/kernel"].ndim == 2


def model_config_from_big_vision(flat: dict, max_patches: int = common.DEFAULT_MAX_PATCHES) -> dict:
  """mmjax `config.model` inferred from big_vision two-tower parameter names and shapes; a NaFlex
  image tower's images take `max_patches` patches each."""
  for key in ("img/embedding/kernel", "txt/Embed_0/embedding", "t"):
    if key not in flat:
      raise ConversionError(f"not a big_vision two-tower checkpoint: no {key!r} (has e.g. {sorted(flat)[:5]})")
  if "img/pos_embedding" not in flat:
    raise ConversionError("img/pos_embedding missing: image towers with fixed sincos2d positions are not supported")
  image = _tower(flat, "img", "Transformer", "image tower")
  if _is_naflex(flat):
    patch, grid = math.isqrt(flat["img/embedding/kernel"].shape[0] // 3), flat["img/pos_embedding"].shape[0]
    if patch * patch * 3 != flat["img/embedding/kernel"].shape[0]:
      raise ConversionError(f"img/embedding/kernel {flat['img/embedding/kernel'].shape}: a NaFlex patch embedding "
                            "takes p * p * 3 values per patch")
    image.update(naflex=True, posemb_grid=grid)
  else:
    patch = flat["img/embedding/kernel"].shape[0]
    grid = math.isqrt(flat["img/pos_embedding"].shape[1])
  image.update(patch_size=patch, posemb="learn", pool=image.get("pool", "tok" if "img/cls" in flat else "gap"))
  vocab, _ = flat["txt/Embed_0/embedding"].shape
  text = _tower(flat, "txt", "Encoder_0", "text tower")
  text.update(vocab_size=vocab, max_len=flat["txt/pos_embedding"].shape[1], pool=text.get("pool", "last"),
              causal=False, eos_id=1)
  embed_dim = flat["txt/head/kernel"].shape[1] if text["head"] == "dense" else text["width"]
  return common.model_config(image=image, text=text, embed_dim=embed_dim, image_size=grid * patch,
                             temperature_init=math.exp(float(flat["t"].reshape(-1)[0])),
                             bias_init=float(flat["b"].reshape(-1)[0]) if "b" in flat else None,
                             max_patches=max_patches)


def from_big_vision(npz_path: str | os.PathLike, max_patches: int = common.DEFAULT_MAX_PATCHES) -> tuple[dict, dict]:
  """`(mmjax model config, params)` from a big_vision SigLIP or SigLIP 2 `.npz` (keys with or without
  `params/`). `max_patches`: a NaFlex model's patch budget per image."""
  try:
    with np.load(npz_path) as npz:
      flat = {k.removeprefix("params/"): np.asarray(npz[k], np.float32) for k in npz.files}
  except (OSError, ValueError) as e:
    raise ConversionError(f"{npz_path}: cannot read as .npz ({e})") from e
  mc = model_config_from_big_vision(flat, max_patches)
  if mc["image"].get("naflex"):
    positions = flat["img/pos_embedding"]
    flat["img/embedding/kernel"] = common.naflex_kernel(flat["img/embedding/kernel"], mc["image"]["patch_size"])
    flat["img/pos_embedding"] = positions.reshape(1, -1, positions.shape[-1])
  common.check_params(flat, mc, what=f"{npz_path}")
  return mc, common.nest(flat)
