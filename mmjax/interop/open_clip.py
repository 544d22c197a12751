"""open_clip checkpoints (its native ViT image tower and text transformer) -> mmjax.

The model config is open_clip's JSON format (`model_configs/*.json`: `embed_dim`,
`vision_cfg`, `text_cfg`, `quick_gelu`, `init_logit_bias`, ...). Options mmjax cannot
express (timm or HF towers, attentional pooling, layer scale, qk-norm, ...) are refused by
name rather than converted approximately.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from mmjax.errors import ConversionError
from mmjax.interop import common

_BLOCK = dict(ln1="ln_1", attn="attn", ln2="ln_2", fc1="mlp.c_fc", fc2="mlp.c_proj")
# Keys of vision_cfg / text_cfg and the values mmjax can convert (None: any value).
_VISION_OK = {"image_size": None, "patch_size": None, "width": None, "layers": None, "head_width": None,
              "mlp_ratio": None, "patch_dropout": None, "output_tokens": None, "final_ln_after_pool": None,
              "no_ln_pre": None, "norm_kwargs": None, "act_kwargs": None, "pool_type": ("tok",),
              "global_average_pool": (False,), "attentional_pool": (False,), "ls_init_value": (None,),
              "pos_embed_type": ("learnable",), "timm_model_name": (None,), "output_dim": None,
              "qk_norm": (False,), "scaled_cosine_attn": (False,), "scale_heads": (False,),
              "scale_attn_inner": (False,), "scale_attn": (False,), "scale_fc": (False,),
              "block_type": (None, "default")}
_TEXT_OK = {"context_length": None, "vocab_size": None, "width": None, "heads": None, "layers": None,
            "mlp_ratio": None, "pool_type": ("argmax", "eos", "last", "first"), "proj_type": ("linear", "none"),
            "proj_bias": None, "no_causal_mask": None, "pad_id": None, "eos_id": None, "output_tokens": None,
            "norm_kwargs": None, "act_kwargs": None, "embed_cls": (False,), "ls_init_value": (None,),
            "hf_model_name": (None,), "hf_tokenizer_name": None, "tokenizer_kwargs": None,
            "use_pad_mask": (False,), "qk_norm": (False,), "scaled_cosine_attn": (False,),
            "scale_heads": (False,), "scale_attn_inner": (False,), "scale_attn": (False,),
            "scale_fc": (False,), "block_type": (None, "default"), "output_dim": None}


def _check(cfg: Mapping[str, Any], allowed: Mapping[str, Any], prefix: str) -> None:
  bad = [f"{prefix}.{k}={v!r}" for k, v in cfg.items()
         if k not in allowed or (allowed[k] is not None and v not in allowed[k])]
  if bad:
    raise ConversionError(f"open_clip config options mmjax cannot convert: {', '.join(bad)}")


def _act(cfg: Mapping, side: Mapping) -> str:
  if cfg.get("quick_gelu", False):
    return "quick_gelu"
  approximate = (side.get("act_kwargs") or {}).get("approximate", "none")
  return {"none": "gelu", "tanh": "gelu_tanh"}[approximate]


def model_config_from_open_clip(cfg: Mapping[str, Any]) -> dict:
  """mmjax `config.model` from an open_clip model-config dict."""
  for key in ("embed_dim", "vision_cfg", "text_cfg"):
    if key not in cfg:
      raise ConversionError(f"open_clip model config lacks {key!r}; got keys {sorted(cfg)}")
  vision, text = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
  _check(vision, _VISION_OK, "vision_cfg")
  _check(text, _TEXT_OK, "text_cfg")
  if not isinstance(vision.get("layers", 12), int):
    raise ConversionError(f"vision_cfg.layers={vision['layers']!r}: ResNet image towers are not supported")
  size = vision.get("image_size", 224)
  sides = {size} if isinstance(size, int) else set(size)
  if len(sides) != 1:
    raise ConversionError(f"vision_cfg.image_size={size}: only square images are supported")
  size = sides.pop()
  width, t_width = vision.get("width", 768), text.get("width", 512)
  eps = lambda side: float((side.get("norm_kwargs") or {}).get("eps", 1e-5))
  image = dict(width=width, depth=vision.get("layers", 12), mlp_dim=int(width * vision.get("mlp_ratio", 4.0)),
               num_heads=width // vision.get("head_width", 64), patch_size=vision.get("patch_size", 16),
               posemb="learn", pool="tok", pre_norm=not vision.get("no_ln_pre", False), head="linear",
               act=_act(cfg, vision), norm_eps=eps(vision))
  pool = text.get("pool_type", "argmax")
  proj = "none" if text.get("proj_type", "linear") == "none" else ("dense" if text.get("proj_bias") else "linear")
  txt = dict(vocab_size=text.get("vocab_size", 49408), max_len=text.get("context_length", 77), width=t_width,
             depth=text.get("layers", 12), mlp_dim=int(t_width * text.get("mlp_ratio", 4.0)),
             num_heads=text.get("heads", 8), pool=pool, causal=not text.get("no_causal_mask", False),
             eos_id=text.get("eos_id", 2), head=proj, act=_act(cfg, text), norm_eps=eps(text))
  bias = cfg.get("init_logit_bias")
  return common.model_config(image=image, text=txt, embed_dim=cfg["embed_dim"], image_size=size,
                             temperature_init=math.exp(cfg.get("init_logit_scale", math.log(1 / 0.07))),
                             bias_init=bias)


def _config_from_model(model) -> dict:
  """An open_clip model-config dict read off an open_clip `CLIP` model object."""
  import torch.nn as tnn
  visual = getattr(model, "visual", None)
  if type(model).__name__ != "CLIP" or type(visual).__name__ != "VisionTransformer":
    raise ConversionError(f"from_open_clip supports open_clip's CLIP with its native VisionTransformer, got "
                          f"{type(model).__name__} with image tower {type(visual).__name__}")
  v_block, t_block = visual.transformer.resblocks[0], model.transformer.resblocks[0]
  if type(v_block).__name__ != "ResidualAttentionBlock" or type(t_block).__name__ != "ResidualAttentionBlock":
    raise ConversionError("custom residual blocks (qk-norm, scaled cosine attention, ...) are not supported")
  if not isinstance(v_block.ls_1, tnn.Identity) or not isinstance(t_block.ls_1, tnn.Identity):
    raise ConversionError("layer scale (ls_init_value) is not supported")
  if visual.attn_pool is not None:
    raise ConversionError("open_clip's attentional pooling (CoCa) is not supported")
  if getattr(model, "cls_emb", None) is not None:
    raise ConversionError("text towers with a class token (embed_cls) are not supported")

  def act_kwargs(block):
    act = block.mlp.gelu
    return {"approximate": act.approximate} if isinstance(act, tnn.GELU) else {}

  quick = type(v_block.mlp.gelu).__name__ == "QuickGELU"
  proj = model.text_projection
  vision = dict(image_size=list(visual.image_size), patch_size=visual.patch_size[0], width=visual.conv1.out_channels,
                layers=len(visual.transformer.resblocks),
                head_width=visual.conv1.out_channels // v_block.attn.num_heads,
                mlp_ratio=v_block.mlp.c_fc.out_features / visual.conv1.out_channels,
                no_ln_pre=isinstance(visual.ln_pre, tnn.Identity), pool_type=visual.pool_type,
                norm_kwargs={"eps": visual.ln_post.eps}, act_kwargs=act_kwargs(v_block))
  text = dict(context_length=model.context_length, vocab_size=model.vocab_size,
              width=model.token_embedding.embedding_dim, heads=t_block.attn.num_heads,
              layers=len(model.transformer.resblocks),
              mlp_ratio=t_block.mlp.c_fc.out_features / model.token_embedding.embedding_dim,
              pool_type=model.text_pool_type, eos_id=getattr(model, "text_eos_id", 2),
              no_causal_mask=model.attn_mask is None, proj_type="none" if proj is None else "linear",
              proj_bias=isinstance(proj, tnn.Linear), norm_kwargs={"eps": model.ln_final.eps},
              act_kwargs=act_kwargs(t_block))
  cfg = dict(embed_dim=visual.output_dim, quick_gelu=quick, vision_cfg=vision, text_cfg=text)
  if getattr(model, "logit_bias", None) is not None:
    cfg["init_logit_bias"] = float(model.logit_bias.detach().reshape(-1)[0])
  return cfg


def _rules(mc: Mapping) -> list[common.Rule]:
  img, txt = mc["image"], mc["text"]
  rules = [common.conv_patches("img/embedding/kernel", "visual.conv1.weight"),
           common.class_token_rule("visual.class_embedding", "visual.positional_embedding")]
  if img["pre_norm"]:
    rules += common.layer_norm("img/pre_norm", "visual.ln_pre")
  rules += common.encoder_rules("img/Transformer", "visual.transformer.resblocks", img["depth"],
                                img["num_heads"], _BLOCK, fused=True, final_norm="visual.ln_post")
  rules.append(common.same("img/head/kernel", "visual.proj"))
  rules.append(common.same("txt/Embed_0/embedding", "token_embedding.weight"))
  rules.append(common.same("txt/pos_embedding", "positional_embedding", lambda p: p[None], lambda p: p[0]))
  rules += common.encoder_rules("txt/Encoder_0", "transformer.resblocks", txt["depth"], txt["num_heads"],
                                _BLOCK, fused=True, final_norm="ln_final")
  if txt["head"] == "linear":
    rules.append(common.same("txt/head/kernel", "text_projection"))
  elif txt["head"] == "dense":
    rules += common.dense("txt/head", "text_projection")
  rules.append(common.scalar_param("t", "logit_scale"))
  if mc["bias_init"] is not None:
    rules.append(common.scalar_param("b", "logit_bias"))
  return rules


def from_open_clip(model_or_state_dict, model_config: Mapping | None = None) -> tuple[dict, dict]:
  """`(mmjax model config, params)` from an open_clip model, or a state dict plus its model config.

  With a model object the config is read off the modules; with a state dict,
  `model_config` is the open_clip JSON config (`embed_dim`, `vision_cfg`, `text_cfg`, ...).
  """
  if hasattr(model_or_state_dict, "state_dict"):
    oc_config = _config_from_model(model_or_state_dict) if model_config is None else model_config
    state_dict = model_or_state_dict.state_dict()
  else:
    if model_config is None:
      raise ConversionError("from_open_clip(state_dict) needs model_config, the open_clip model-config dict "
                            "(open_clip/model_configs/<name>.json)")
    oc_config, state_dict = model_config, model_or_state_dict
  mc = model_config_from_open_clip(oc_config)
  return common.convert(_rules(mc), state_dict, mc, what="open_clip state dict")
