"""HF transformers `CLIPModel`, `SiglipModel` and `Siglip2Model` (NaFlex) <-> mmjax, both directions from
one rule table."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import numpy as np

from mmjax import models
from mmjax.errors import ConversionError
from mmjax.interop import common

_BLOCK = dict(ln1="layer_norm1", attn="self_attn", ln2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2")
_ACT_FROM_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# Buffers HF may keep in a state dict; they hold no parameters.
_IGNORE = (r".*position_ids",)
_get = common.config_value
_CONFIG_CLASSES = {"clip": "CLIPConfig", "siglip": "SiglipConfig", "siglip2": "Siglip2Config"}


def _act(side, name: str) -> str:
  act = _get(side, "hidden_act")
  if act not in _ACT_FROM_HF:
    raise ConversionError(f"{name}.hidden_act={act!r} is not supported; known: {sorted(_ACT_FROM_HF)}")
  return _ACT_FROM_HF[act]


def _tower(side, name: str) -> dict:
  return dict(width=_get(side, "hidden_size"), depth=_get(side, "num_hidden_layers"),
              mlp_dim=_get(side, "intermediate_size"), num_heads=_get(side, "num_attention_heads"),
              act=_act(side, name), norm_eps=float(_get(side, "layer_norm_eps")))


def model_config_from_hf(hf_config, max_patches: int = common.DEFAULT_MAX_PATCHES) -> dict:
  """mmjax `config.model` from a `CLIPConfig` / `SiglipConfig` / `Siglip2Config` (or its dict).

  A SigLIP 2 (NaFlex) model's images take `max_patches` patches each, which its processor sets
  and its config does not record."""
  cfg = common.hf_config_object(hf_config, _CONFIG_CLASSES)
  kind = _get(cfg, "model_type")
  vision, text = _get(cfg, "vision_config"), _get(cfg, "text_config")
  if _get(vision, "num_channels", 3) != 3:
    raise ConversionError(f"vision_config.num_channels={_get(vision, 'num_channels')}: mmjax takes RGB images")
  image = dict(_tower(vision, "vision_config"), patch_size=_get(vision, "patch_size"), posemb="learn")
  txt = dict(_tower(text, "text_config"), vocab_size=_get(text, "vocab_size"),
             max_len=_get(text, "max_position_embeddings"))
  if kind == "clip":
    eos = _get(text, "eos_token_id")
    # HF keeps the pre-2023 rule for configs whose eos_token_id is 2: pool at the highest id.
    txt.update(pool="argmax" if eos == 2 else "eos", eos_id=eos, causal=True, head="linear")
    image.update(pool="tok", pre_norm=True, head="linear")
    return common.model_config(image=image, text=txt, embed_dim=_get(cfg, "projection_dim"),
                               image_size=_get(vision, "image_size"),
                               temperature_init=math.exp(_get(cfg, "logit_scale_init_value")), bias_init=None)
  if kind in ("siglip", "siglip2"):
    if not _get(vision, "vision_use_head", True):
      raise ConversionError("vision_config.vision_use_head=False: a SigLIP image tower without its "
                            "attention-pooling head has no embedding to convert")
    embed_dim = _get(text, "projection_size") or txt["width"]
    if embed_dim != image["width"]:
      raise ConversionError(f"text_config.projection_size={embed_dim} differs from vision_config.hidden_size="
                            f"{image['width']}; SigLIP's image embedding is its pooled features")
    txt.update(pool="last", causal=False, head="dense", eos_id=_get(text, "eos_token_id", 1))
    image.update(pool="map", pre_norm=False, head="none")
    if kind == "siglip":
      return common.model_config(image=image, text=txt, embed_dim=embed_dim, image_size=_get(vision, "image_size"),
                                 temperature_init=10.0, bias_init=-10.0)
    positions = _get(vision, "num_patches")
    grid = math.isqrt(positions)
    if grid * grid != positions:
      raise ConversionError(f"vision_config.num_patches={positions}: NaFlex positions are a square grid")
    image.update(naflex=True, posemb_grid=grid)
    return common.model_config(image=image, text=txt, embed_dim=embed_dim, image_size=grid * image["patch_size"],
                               temperature_init=10.0, bias_init=-10.0, max_patches=max_patches)
  raise ConversionError(f"HF model_type={kind!r}; supported: {', '.join(map(repr, _CONFIG_CLASSES))}")


def _map_head_rules(num_heads: int) -> list[common.Rule]:
  h = "img/MAPHead_0"
  return ([common.same(f"{h}/probe", "vision_model.head.probe")]
          + common.attention(f"{h}/MultiHeadDotProductAttention_0", "vision_model.head.attention", num_heads, True)
          + common.layer_norm(f"{h}/LayerNorm_0", "vision_model.head.layernorm")
          + common.dense(f"{h}/MlpBlock_0/Dense_0", "vision_model.head.mlp.fc1")
          + common.dense(f"{h}/MlpBlock_0/Dense_1", "vision_model.head.mlp.fc2"))


def rules_for(mc: Mapping) -> list[common.Rule]:
  img, txt = mc["image"], mc["text"]
  clip = img["pool"] == "tok"
  v, t = "vision_model", "text_model"
  if img.get("naflex"):  # A Linear over patches flattened row by row, channels last.
    rules = [common.same("img/embedding/kernel", f"{v}.embeddings.patch_embedding.weight",
                         lambda w: common.naflex_kernel(w.T, img["patch_size"]), lambda k: common.flat_kernel(k).T)]
  else:
    rules = [common.conv_patches("img/embedding/kernel", f"{v}.embeddings.patch_embedding.weight")]
  if clip:
    rules.append(common.class_token_rule(f"{v}.embeddings.class_embedding", f"{v}.embeddings.position_embedding.weight"))
    rules += common.layer_norm("img/pre_norm", f"{v}.pre_layrnorm")
  else:
    rules.append(common.same("img/embedding/bias", f"{v}.embeddings.patch_embedding.bias"))
    rules.append(common.same("img/pos_embedding", f"{v}.embeddings.position_embedding.weight",
                             lambda p: p[None], lambda p: p[0]))
  rules += common.encoder_rules("img/Transformer", f"{v}.encoder.layers", img["depth"], img["num_heads"], _BLOCK,
                                fused=False, final_norm=f"{v}.post_layernorm")
  rules += common.dense("img/head", "visual_projection", bias=False) if clip else _map_head_rules(img["num_heads"])
  rules.append(common.same("txt/Embed_0/embedding", f"{t}.embeddings.token_embedding.weight"))
  rules.append(common.same("txt/pos_embedding", f"{t}.embeddings.position_embedding.weight",
                           lambda p: p[None], lambda p: p[0]))
  rules += common.encoder_rules("txt/Encoder_0", f"{t}.encoder.layers", txt["depth"], txt["num_heads"], _BLOCK,
                                fused=False, final_norm=f"{t}.final_layer_norm")
  rules += common.dense("txt/head", "text_projection", bias=False) if clip else common.dense("txt/head", f"{t}.head")
  rules.append(common.scalar_param("t", "logit_scale"))
  if not clip:
    rules.append(common.scalar_param("b", "logit_bias"))
  return rules


def from_hf(model_or_state_dict, hf_config=None, max_patches: int = common.DEFAULT_MAX_PATCHES) -> tuple[dict, dict]:
  """`(mmjax model config, params)` from a HF `CLIPModel` / `SiglipModel` / `Siglip2Model`, or a state
  dict plus config. `max_patches`: a SigLIP 2 model's patch budget per image (its processor's
  `max_num_patches`)."""
  state_dict, hf_config = common.state_dict_and_config(model_or_state_dict, hf_config, "from_hf",
                                                      "a CLIPConfig/SiglipConfig/Siglip2Config")
  mc = model_config_from_hf(hf_config, max_patches)
  return common.convert(rules_for(mc), state_dict, mc, ignore=_IGNORE, what="HF state dict")


# The mmjax architectures HF has, as allowed values of the architecture's keys (see `_architecture`).
_SIGLIP = {"image.pool": ("map",), "image.pre_norm": (False,), "image.head": ("none",), "image.posemb": ("learn",),
           "text.causal": (False,), "text.pool": ("last",), "text.head": ("dense",), "logit bias": (True,)}
_HF_ARCHITECTURES = {
    "clip": {"image.pool": ("tok",), "image.pre_norm": (True,), "image.head": ("linear",),
             "image.posemb": ("learn",), "image.naflex": (False,), "text.causal": (True,),
             "text.pool": ("argmax", "eos"), "text.head": ("linear",), "logit bias": (False,)},
    "siglip": {**_SIGLIP, "image.naflex": (False,)},
    "siglip2": {**_SIGLIP, "image.naflex": (True,)},
}


def _with_module_defaults(module_cls, tower: Mapping) -> dict:
  defaults = {f.name: f.default for f in dataclasses.fields(module_cls) if f.default is not dataclasses.MISSING}
  return {**defaults, **tower}


def _architecture(img: Mapping, txt: Mapping, bias_init) -> str:
  """'clip' or 'siglip' when the resolved towers have exactly that architecture, else an error."""
  img, txt = _with_module_defaults(models.ViT, img), _with_module_defaults(models.TextTransformer, txt)
  have = {"image.pool": img["pool"], "image.pre_norm": img["pre_norm"], "image.head": img["head"],
          "image.posemb": img["posemb"], "image.naflex": img["naflex"], "text.causal": txt["causal"],
          "text.pool": txt["pool"], "text.head": txt["head"], "logit bias": bias_init is not None}
  problems = {}
  for kind, allowed in _HF_ARCHITECTURES.items():
    bad = [f"{k}={have[k]!r} (needs {' or '.join(map(repr, v))})" for k, v in allowed.items() if have[k] not in v]
    if not bad:
      return kind
    problems[kind] = bad
  raise ConversionError("to_hf: the model is none of HF CLIP, SigLIP and SigLIP 2:\n  "
                        + "\n  ".join(f"{k}: {', '.join(v)}" for k, v in problems.items()))


def _hf_tower(side: Mapping) -> dict[str, Any]:
  if side["act"] not in _ACT_TO_HF:
    raise ConversionError(f"activation {side['act']!r} has no HF equivalent")
  return dict(hidden_size=side["width"], num_hidden_layers=side["depth"], intermediate_size=side["mlp_dim"],
              num_attention_heads=side["num_heads"], hidden_act=_ACT_TO_HF[side["act"]],
              layer_norm_eps=side["norm_eps"])


def to_hf(model_config: Mapping, params):
  """A HF `CLIPModel`, `SiglipModel` or `Siglip2Model` (torch, eval mode) holding `params`.

  The architecture must be one HF has (`_HF_ARCHITECTURES`); a CLIP model's patch bias is
  folded into its position embeddings, which HF's CLIP lacks a bias for.
  """
  import torch
  import transformers
  mc = dict(model_config)
  img, txt = mc["image"], mc["text"] = models.resolve_tower(mc, "image"), models.resolve_tower(mc, "text")
  kind = _architecture(img, txt, mc.get("bias_init"))
  vision = dict(_hf_tower(img), patch_size=img["patch_size"])
  if kind == "siglip2":
    vision["num_patches"] = img["posemb_grid"] ** 2
  else:
    vision["image_size"] = int(mc["image_size"])
  text = dict(_hf_tower(txt), vocab_size=txt["vocab_size"], max_position_embeddings=txt["max_len"])
  if kind == "clip":
    eos = 2 if txt["pool"] == "argmax" else int(txt["eos_id"])
    text.update(eos_token_id=eos, bos_token_id=None, pad_token_id=0)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=mc["embed_dim"])
    model = transformers.CLIPModel(config)
  else:
    text.update(projection_size=mc["embed_dim"], eos_token_id=int(txt["eos_id"]), bos_token_id=None, pad_token_id=0)
    config_class, model_class = {"siglip": (transformers.SiglipConfig, transformers.SiglipModel),
                                 "siglip2": (transformers.Siglip2Config, transformers.Siglip2Model)}[kind]
    model = model_class(config_class(text_config=text, vision_config=vision))
  flat = common.flatten(params)
  common.check_params(flat, mc, what="params")
  state = common.apply_rules(rules_for(mc), flat, inverse=True, what="mmjax params")
  missing, unexpected = model.load_state_dict({k: torch.tensor(np.asarray(v, np.float32))
                                               for k, v in state.items()}, strict=False)
  missing = [k for k in missing if not any(re.fullmatch(p, k) for p in _IGNORE)]
  if missing or unexpected:
    raise ConversionError(f"to_hf: HF {type(model).__name__} state dict mismatch; missing {missing}, "
                          f"unexpected {unexpected}")
  return model.eval()
