"""HF transformers `SwinModel` -> an mmjax Swin image tower (`mmjax.models.swin.Swin`).

`from_hf_swin(model)` returns `(tower config, params)`: the config is a `model.image` entry
(`arch="swin"`, no head) and the parameters go under a two-tower's `img` or used directly with
`Swin(**config)`. Names are those of transformers 5 (`attention.q_proj`, ..., `o_proj`).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from mmjax.errors import ConversionError
from mmjax.interop import common
from mmjax.models.swin import Swin

_ACT_FROM_HF = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_IGNORE = (r".*relative_position_index",)
_get = common.config_value


def swin_config_from_hf(hf_config) -> dict:
  """The `model.image` tower config of a `SwinConfig` (or its dict)."""
  cfg = common.hf_config_object(hf_config, {"swin": "SwinConfig"})
  refuse = {"use_absolute_embeddings": (False,), "qkv_bias": (True,), "num_channels": (3,),
            "hidden_act": tuple(_ACT_FROM_HF)}
  for key, supported in refuse.items():
    if _get(cfg, key) not in supported:
      raise ConversionError(f"SwinConfig.{key}={_get(cfg, key)!r} is not supported (supported: {supported})")
  return dict(arch="swin", width=_get(cfg, "embed_dim"), depths=tuple(_get(cfg, "depths")),
              num_heads=tuple(_get(cfg, "num_heads")), window_size=_get(cfg, "window_size"),
              patch_size=_get(cfg, "patch_size"), mlp_ratio=float(_get(cfg, "mlp_ratio")),
              act=_ACT_FROM_HF[_get(cfg, "hidden_act")], norm_eps=float(_get(cfg, "layer_norm_eps")), pool="gap",
              head="none", image_size=_get(cfg, "image_size"))


def rules_for(tower: Mapping) -> list[common.Rule]:
  rules = [common.conv_patches("embedding/kernel", "embeddings.patch_embeddings.projection.weight"),
           common.same("embedding/bias", "embeddings.patch_embeddings.projection.bias")]
  rules += common.layer_norm("embedding_norm", "embeddings.norm")
  for i, (depth, heads) in enumerate(zip(tower["depths"], tower["num_heads"])):
    if i:
      merge = f"encoder.layers.{i - 1}.downsample"
      rules += common.layer_norm(f"merge{i}/norm", f"{merge}.norm")
      rules += common.dense(f"merge{i}/reduction", f"{merge}.reduction", bias=False)
    for j in range(depth):
      b, s = f"stage{i}_block{j}", f"encoder.layers.{i}.blocks.{j}"
      rules += common.layer_norm(f"{b}/norm_attention", f"{s}.layernorm_before")
      rules += common.attention(f"{b}/attention", f"{s}.attention", heads, fused=False, out="o_proj")
      rules.append(common.same(f"{b}/relative_position_bias",
                               f"{s}.attention.relative_position_bias.relative_position_bias_table"))
      rules += common.layer_norm(f"{b}/norm_mlp", f"{s}.layernorm_after")
      rules += common.dense(f"{b}/mlp/Dense_0", f"{s}.mlp.fc1") + common.dense(f"{b}/mlp/Dense_1", f"{s}.mlp.fc2")
  return rules + common.layer_norm("norm", "layernorm")


def from_hf_swin(model_or_state_dict, hf_config=None) -> tuple[dict, dict]:
  """`(tower config, params)` from a HF `SwinModel` (its pooler has no parameters), or its state dict plus config."""
  state_dict, hf_config = common.state_dict_and_config(model_or_state_dict, hf_config, "from_hf_swin", "a SwinConfig")
  tower = swin_config_from_hf(hf_config)
  flat = common.apply_rules(rules_for(tower), common.to_numpy(state_dict), ignore=_IGNORE, what="HF state dict")
  size = tower["image_size"]
  module = Swin(**{k: v for k, v in tower.items() if k not in ("arch", "image_size")})
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"]
  common.check_params(flat, tower, what="HF state dict",
                      expected={k: tuple(v.shape) for k, v in common.flatten(shapes).items()})
  return tower, common.nest(flat)
