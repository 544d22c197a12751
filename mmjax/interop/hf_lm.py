"""HF transformers causal LMs -> mmjax `Decoder`: `GPT2LMHeadModel`, `LlamaForCausalLM`, `GemmaForCausalLM`.

The architecture comes from the HF config; anything the `Decoder` cannot reproduce exactly
(scaled RoPE, GPT-2's per-layer attention scaling, cross-attention, ...) raises
`ConversionError` naming the HF config key. GPT-2's Conv1D weights are stored [in, out] and its
q/k/v are one fused `c_attn`; Llama and Gemma rotate in the rotate-half convention, which
`mmjax.models.decoder.apply_rope` follows, so no weight is permuted.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConversionError
from mmjax.interop import common
from mmjax.models.decoder import build_decoder, decoder_config

_ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
                "silu": "silu", "swish": "silu"}
# Buffers some transformers versions keep in a state dict; they hold no parameters.
_IGNORE = (r".*\.attn\.(masked_)?bias", r".*rotary_emb\.inv_freq")
_get = common.config_value
_CONFIG_CLASSES = {"gpt2": "GPT2Config", "llama": "LlamaConfig", "gemma": "GemmaConfig"}


def _act(cfg, key: str) -> str:
  act = _get(cfg, key)
  if act not in _ACT_FROM_HF:
    raise ConversionError(f"HF config {key}={act!r} is not supported; known: {sorted(_ACT_FROM_HF)}")
  return _ACT_FROM_HF[act]


def _refuse(cfg, key: str, supported, why: str):
  value = _get(cfg, key, supported)
  if value != supported:
    raise ConversionError(f"HF config {key}={value!r} is not supported ({why})")


def _rope_theta(cfg) -> float:
  """theta of default RoPE; any other rope type (linear, dynamic, yarn, llama3, ...) is refused."""
  rope = _get(cfg, "rope_parameters") or _get(cfg, "rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise ConversionError(f"HF config rope_scaling / rope_parameters rope_type={kind!r} is not supported "
                          "(only unscaled RoPE)")
  return float(rope.get("rope_theta", _get(cfg, "rope_theta", 10000.0)))


def decoder_config_from_hf(hf_config) -> dict:
  """A complete `decoder_config` dict from a `GPT2Config` / `LlamaConfig` / `GemmaConfig` (or its dict)."""
  cfg = common.hf_config_object(hf_config, _CONFIG_CLASSES)
  kind = _get(cfg, "model_type")
  if kind not in _CONFIG_CLASSES:
    raise ConversionError(f"HF model_type={kind!r}; supported: {sorted(_CONFIG_CLASSES)}")
  tie = bool(_get(cfg, "tie_word_embeddings", True))
  if kind == "gpt2":
    _refuse(cfg, "scale_attn_weights", True, "attention logits are always scaled by 1/sqrt(head_dim)")
    _refuse(cfg, "scale_attn_by_inverse_layer_idx", False, "no per-layer attention scaling")
    _refuse(cfg, "add_cross_attention", False, "decoder-only")
    width = _get(cfg, "n_embd")
    return decoder_config(vocab_size=_get(cfg, "vocab_size"), width=width, depth=_get(cfg, "n_layer"),
                          num_heads=_get(cfg, "n_head"), mlp_dim=_get(cfg, "n_inner") or 4 * width,
                          max_len=_get(cfg, "n_positions"), positions="learn", norm="layernorm",
                          norm_eps=float(_get(cfg, "layer_norm_epsilon")), mlp="mlp",
                          act=_act(cfg, "activation_function"), attention_bias=True, mlp_bias=True,
                          tie_embeddings=tie)
  if _get(cfg, "use_bidirectional_attention"):
    raise ConversionError("HF config use_bidirectional_attention=True is not supported (causal attention only)")
  width, heads = _get(cfg, "hidden_size"), _get(cfg, "num_attention_heads")
  gemma = kind == "gemma"
  return decoder_config(vocab_size=_get(cfg, "vocab_size"), width=width, depth=_get(cfg, "num_hidden_layers"),
                        num_heads=heads, num_kv_heads=_get(cfg, "num_key_value_heads") or heads,
                        head_dim=_get(cfg, "head_dim") or width // heads, mlp_dim=_get(cfg, "intermediate_size"),
                        max_len=_get(cfg, "max_position_embeddings"), positions="rope", rope_theta=_rope_theta(cfg),
                        norm="rmsnorm", norm_eps=float(_get(cfg, "rms_norm_eps")), norm_plus_one=gemma,
                        mlp="gated", act=_act(cfg, "hidden_act"), attention_bias=bool(_get(cfg, "attention_bias")),
                        mlp_bias=bool(_get(cfg, "mlp_bias", False)), tie_embeddings=tie, scale_embeddings=gemma)


def _gpt2_rules(cfg: Mapping) -> list[common.Rule]:
  h = cfg["num_heads"]

  def split_qkv(w, b):  # Conv1D [in, 3 * out] -> three [in, heads, head_dim] kernels and [heads, head_dim] biases.
    return (*(x.reshape(x.shape[0], h, -1) for x in np.split(w, 3, axis=1)),
            *(x.reshape(h, -1) for x in np.split(b, 3)))

  def join_qkv(*a):
    return (np.concatenate([k.reshape(k.shape[0], -1) for k in a[:3]], axis=1),
            np.concatenate([b.reshape(-1) for b in a[3:]]))

  rules = [common.same("embedder/embedding", "transformer.wte.weight"),
           common.same("pos_embedding", "transformer.wpe.weight")]
  for i in range(cfg["depth"]):
    mm, src = f"layers_{i}", f"transformer.h.{i}"
    att = f"{mm}/attention"
    rules += common.layer_norm(f"{mm}/attention_norm", f"{src}.ln_1")
    rules.append(common.Rule(tuple(f"{att}/{n}/{p}" for p in ("kernel", "bias") for n in ("query", "key", "value")),
                             (f"{src}.attn.c_attn.weight", f"{src}.attn.c_attn.bias"), split_qkv, join_qkv))
    rules.append(common.same(f"{att}/out/kernel", f"{src}.attn.c_proj.weight", lambda w: w.reshape(h, -1, w.shape[1]),
                             lambda k: k.reshape(-1, k.shape[-1])))
    rules.append(common.same(f"{att}/out/bias", f"{src}.attn.c_proj.bias"))
    rules += common.layer_norm(f"{mm}/mlp_norm", f"{src}.ln_2")
    for mm_name, src_name in (("fc1", "c_fc"), ("fc2", "c_proj")):  # Conv1D [in, out] is already a flax kernel.
      rules.append(common.same(f"{mm}/feed_forward/{mm_name}/kernel", f"{src}.mlp.{src_name}.weight"))
      rules.append(common.same(f"{mm}/feed_forward/{mm_name}/bias", f"{src}.mlp.{src_name}.bias"))
  return rules + common.layer_norm("final_norm", "transformer.ln_f")


def _llama_rules(cfg: Mapping) -> list[common.Rule]:
  rules = [common.same("embedder/embedding", "model.embed_tokens.weight")]
  bias = cfg["attention_bias"]
  for i in range(cfg["depth"]):
    mm, src = f"layers_{i}", f"model.layers.{i}"
    rules.append(common.same(f"{mm}/attention_norm/scale", f"{src}.input_layernorm.weight"))
    for name, proj, heads in (("query", "q_proj", cfg["num_heads"]), ("key", "k_proj", cfg["num_kv_heads"]),
                              ("value", "v_proj", cfg["num_kv_heads"])):
      rules.append(common.same(f"{mm}/attention/{name}/kernel", f"{src}.self_attn.{proj}.weight",
                               lambda w, heads=heads: common.heads_in(w, heads), common.heads_in_inverse))
      if bias:
        rules.append(common.same(f"{mm}/attention/{name}/bias", f"{src}.self_attn.{proj}.bias",
                                 lambda b, heads=heads: b.reshape(heads, -1), lambda b: b.reshape(-1)))
    heads = cfg["num_heads"]
    rules.append(common.same(f"{mm}/attention/out/kernel", f"{src}.self_attn.o_proj.weight",
                             lambda w: common.heads_out(w, heads), common.heads_out_inverse))
    if bias:
      rules.append(common.same(f"{mm}/attention/out/bias", f"{src}.self_attn.o_proj.bias"))
    rules.append(common.same(f"{mm}/mlp_norm/scale", f"{src}.post_attention_layernorm.weight"))
    for name in ("gate", "up", "down"):
      rules += common.dense(f"{mm}/feed_forward/{name}", f"{src}.mlp.{name}_proj", bias=cfg["mlp_bias"])
  return rules + [common.same("final_norm/scale", "model.norm.weight")]


def rules_for(cfg: Mapping) -> list[common.Rule]:
  """The conversion table for a `decoder_config_from_hf` config (GPT-2 when positions are learned)."""
  rules = _gpt2_rules(cfg) if cfg["positions"] == "learn" else _llama_rules(cfg)
  return rules if cfg["tie_embeddings"] else rules + common.dense("lm_head", "lm_head", bias=False)


def _expected_shapes(cfg: Mapping) -> dict[str, tuple[int, ...]]:
  shapes = jax.eval_shape(lambda: build_decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  return {k: tuple(v.shape) for k, v in common.flatten(shapes["params"]).items()}


def from_hf_lm(model_or_state_dict, hf_config=None) -> tuple[dict, dict]:
  """`(decoder config, params)` from a HF causal LM, or from its state dict plus config (object or dict).

  Tied models may omit `lm_head.weight`; when present it is ignored (it is the embedding).
  """
  state_dict, hf_config = common.state_dict_and_config(model_or_state_dict, hf_config, "from_hf_lm",
                                                      "a GPT2/Llama/Gemma config")
  cfg = decoder_config_from_hf(hf_config)
  ignore = _IGNORE + ((r"lm_head\.weight",) if cfg["tie_embeddings"] else ())
  flat = common.apply_rules(rules_for(cfg), common.to_numpy(state_dict), ignore=ignore, what="HF state dict")
  common.check_params(flat, cfg, what="HF state dict", expected=_expected_shapes(cfg))
  return cfg, common.nest(flat)
