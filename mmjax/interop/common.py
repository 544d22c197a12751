"""What every converter shares: strict bookkeeping of source and target names, and layouts.

A conversion is a list of `Rule`s. Each rule reads some source arrays and writes some mmjax
parameters, and knows the inverse, so one table drives import and (for HF) export. The
source and target sides are checked completely: a source name no rule consumed, a rule
whose source name is absent, an mmjax parameter no rule wrote, or a shape that differs
from the model's raises `ConversionError` listing every offender with its shape.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import models
from mmjax.config import base_config
from mmjax.errors import ConversionError

# A converted NaFlex (SigLIP 2) model's patches per image, unless told otherwise: the default of HF's
# Siglip2ImageProcessor.
DEFAULT_MAX_PATCHES = 256


def config_value(cfg, key, default=None):
  """`key` of an HF config given as an object or as a dict (a saved config.json)."""
  return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)


def hf_config_object(hf_config, kinds: Mapping[str, str]):
  """A transformers config object; a dict gets transformers' defaults from the class named in
  `kinds` for its `model_type`."""
  if not isinstance(hf_config, Mapping):
    return hf_config
  import transformers
  kind = hf_config.get("model_type")
  if kind not in kinds:
    raise ConversionError(f"HF config model_type={kind!r}; supported: {sorted(kinds)}")
  return getattr(transformers, kinds[kind])(**{k: v for k, v in hf_config.items() if k != "model_type"})


def state_dict_and_config(model_or_state_dict, hf_config, caller: str, expects: str):
  """`(state_dict, config)` of a torch model (its own config unless one is given), or a state dict
  with the config it needs (`expects` names it in the error)."""
  if hasattr(model_or_state_dict, "state_dict"):
    return model_or_state_dict.state_dict(), model_or_state_dict.config if hf_config is None else hf_config
  if hf_config is None:
    raise ConversionError(f"{caller}(state_dict) needs hf_config ({expects} or its dict)")
  return model_or_state_dict, hf_config


class Rule(NamedTuple):
  """`mm` parameter paths ('img/head/kernel') from `src` names, and back.

  `to_mm(*src_arrays) -> tuple of mm arrays`; `to_src(*mm_arrays) -> tuple of src arrays`.
  """
  mm: tuple[str, ...]
  src: tuple[str, ...]
  to_mm: Callable
  to_src: Callable


def same(mm: str, src: str, fn=lambda a: a, inverse=lambda a: a) -> Rule:
  """A one-to-one rule with an optional layout change."""
  return Rule((mm,), (src,), lambda a: (fn(a),), lambda a: (inverse(a),))


def dense(mm: str, src: str, bias: bool = True) -> list[Rule]:
  """torch `Linear` (weight [out, in]) <-> flax `Dense` (kernel [in, out])."""
  rules = [same(f"{mm}/kernel", f"{src}.weight", np.transpose, np.transpose)]
  return rules + ([same(f"{mm}/bias", f"{src}.bias")] if bias else [])


def layer_norm(mm: str, src: str) -> list[Rule]:
  return [same(f"{mm}/scale", f"{src}.weight"), same(f"{mm}/bias", f"{src}.bias")]


def heads_in(w, num_heads):
  """torch q/k/v projection weight [out, in] -> einsum kernel [in, heads, head_dim]."""
  return w.T.reshape(w.shape[1], num_heads, -1)


def heads_in_inverse(k):
  return k.reshape(k.shape[0], -1).T


def heads_out(w, num_heads):
  """torch output projection weight [out, in=heads*head_dim] -> kernel [heads, head_dim, out]."""
  return w.T.reshape(num_heads, -1, w.shape[0])


def heads_out_inverse(k):
  return k.reshape(-1, k.shape[-1]).T


def attention(mm: str, src: str, num_heads: int, fused: bool, out: str = "out_proj") -> list[Rule]:
  """flax-layout attention (`query/key/value/out`) from torch projections.

  `fused`: torch `nn.MultiheadAttention` (`in_proj_weight` [3w, w], `out_proj`); otherwise
  HF's separate `q_proj`, `k_proj`, `v_proj` and `out` (`out_proj`; Swin's is `o_proj`).
  """
  h = num_heads
  names = ("query", "key", "value")
  if fused:
    def split(w, b):
      ws, bs = np.split(w, 3), np.split(b, 3)
      return (*(heads_in(x, h) for x in ws), *(x.reshape(h, -1) for x in bs))

    def join(*a):
      kernels, biases = a[:3], a[3:]
      return (np.concatenate([heads_in_inverse(k) for k in kernels]),
              np.concatenate([b.reshape(-1) for b in biases]))

    rules = [Rule(tuple(f"{mm}/{n}/kernel" for n in names) + tuple(f"{mm}/{n}/bias" for n in names),
                  (f"{src}.in_proj_weight", f"{src}.in_proj_bias"), split, join)]
  else:
    rules = []
    for n, t in zip(names, ("q_proj", "k_proj", "v_proj")):
      rules.append(same(f"{mm}/{n}/kernel", f"{src}.{t}.weight", lambda w: heads_in(w, h), heads_in_inverse))
      rules.append(same(f"{mm}/{n}/bias", f"{src}.{t}.bias", lambda b: b.reshape(h, -1), lambda b: b.reshape(-1)))
  rules.append(same(f"{mm}/out/kernel", f"{src}.{out}.weight", lambda w: heads_out(w, h), heads_out_inverse))
  rules.append(same(f"{mm}/out/bias", f"{src}.{out}.bias"))
  return rules


def conv_patches(mm: str, src: str) -> Rule:
  """torch Conv2d weight [out, in, kh, kw] <-> flax Conv kernel [kh, kw, in, out]."""
  return same(mm, src, lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))


def naflex_kernel(flat, patch_size: int):
  """A patch embedding over flattened NaFlex patches [p * p * 3, width] (row by row, channels last) ->
  mmjax's convolution layout [p, p, 3, width]."""
  return flat.reshape(patch_size, patch_size, -1, flat.shape[-1])


def flat_kernel(kernel):
  """The inverse of `naflex_kernel`."""
  return kernel.reshape(-1, kernel.shape[-1])


def scalar_param(mm: str, src: str) -> Rule:
  """A scalar (shape [] or [1]) source parameter <-> mmjax's shape-(1,) `t` / `b`."""
  return same(mm, src, lambda a: np.reshape(a, (1,)), lambda a: a)


# Checking --------------------------------------------------------------------------------


def _fmt(names: Iterable[str], shapes: Mapping[str, tuple]) -> str:
  return ", ".join(f"{n} {tuple(shapes[n])}" if n in shapes else n for n in sorted(names))


def expected_shapes(model_config: Mapping) -> dict[str, tuple[int, ...]]:
  """Flat 'a/b/c' -> shape of every parameter the model built from `model_config` has."""
  model = models.build(model_config)
  if model_config["image"].get("naflex"):
    patch = models.resolve_tower(model_config, "image")["patch_size"]
    image = dict(patches=jax.ShapeDtypeStruct((1, 1, patch * patch * 3), jnp.float32),
                 grid=jax.ShapeDtypeStruct((1, 2), jnp.int32))
  else:
    size = int(model_config["image_size"])
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  text = jax.ShapeDtypeStruct((1, int(model_config["text"]["max_len"])), jnp.int32)
  shapes = jax.eval_shape(lambda i, t: model.init(jax.random.PRNGKey(0), image=i, text=t)["params"], image, text)
  return {k: tuple(v.shape) for k, v in flatten(shapes).items()}


def apply_rules(rules: Sequence[Rule], source: Mapping[str, np.ndarray], *, inverse: bool = False,
                ignore: Sequence[str] = (), what: str = "checkpoint") -> dict[str, np.ndarray]:
  """Runs every rule forward (source names -> mm paths) or inverse; checks both sides.

  `ignore` are regexes of source names that carry no parameters (e.g. HF's `position_ids`).
  Every source name must be consumed and every rule's inputs present.
  """
  reads, writes = ("mm", "src") if inverse else ("src", "mm")
  missing = [n for r in rules for n in getattr(r, reads) if n not in source]
  consumed = {n for r in rules for n in getattr(r, reads)}
  unexpected = [n for n in source if n not in consumed and not any(re.fullmatch(p, n) for p in ignore)]
  if missing or unexpected:
    shapes = {n: np.shape(a) for n, a in source.items()}
    msg = [f"{what} does not match the model config:"]
    if missing:
      msg.append(f"missing {len(missing)}: {_fmt(missing, shapes)}")
    if unexpected:
      msg.append(f"unexpected {len(unexpected)}: {_fmt(unexpected, shapes)}")
    raise ConversionError("\n  ".join(msg))
  out = {}
  for r in rules:
    fn = r.to_src if inverse else r.to_mm
    values = fn(*(np.asarray(source[n]) for n in getattr(r, reads)))
    out.update(zip(getattr(r, writes), values))
  return out


def check_params(flat: Mapping[str, np.ndarray], model_config: Mapping, what: str = "converted parameters",
                 expected: Mapping[str, tuple[int, ...]] | None = None):
  """Raises unless `flat` has exactly the model's parameter names and shapes (`expected`, by
  default those of the two-tower model built from `model_config`)."""
  expected = expected_shapes(model_config) if expected is None else expected
  missing = [n for n in expected if n not in flat]
  unexpected = [n for n in flat if n not in expected]
  wrong = [n for n in expected if n in flat and tuple(np.shape(flat[n])) != expected[n]]
  if missing or unexpected or wrong:
    msg = [f"{what} do not fit the model:"]
    if missing:
      msg.append(f"missing {len(missing)}: {_fmt(missing, expected)}")
    if unexpected:
      msg.append(f"unexpected {len(unexpected)}: {_fmt(unexpected, {n: np.shape(flat[n]) for n in flat})}")
    if wrong:
      msg.append("wrong shape: " + ", ".join(f"{n} {tuple(np.shape(flat[n]))} (model: {expected[n]})"
                                             for n in sorted(wrong)))
    raise ConversionError("\n  ".join(msg))


def nest(flat: Mapping[str, np.ndarray]) -> dict:
  """'a/b/c' -> nested dicts of float32 numpy arrays."""
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): np.asarray(v, np.float32)
                                            for k, v in flat.items()})


def flatten(params) -> dict:
  """Nested (possibly boxed) parameters -> 'a/b/c' -> leaf."""
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(flax.linen.meta.unbox(params)).items()}


def to_numpy(state_dict: Mapping) -> dict[str, np.ndarray]:
  """A torch or numpy state dict as float32 numpy arrays (torch tensors are detached on CPU)."""
  out = {}
  for k, v in state_dict.items():
    if hasattr(v, "detach"):
      v = v.detach().cpu().float().numpy()
    out[k] = np.asarray(v, np.float32)
  return out


def convert(rules: Sequence[Rule], state_dict: Mapping, model_config: dict, *, ignore: Sequence[str] = (),
            what: str = "checkpoint") -> tuple[dict, dict]:
  """`(model_config, nested params)` from a source state dict, checked on both sides."""
  flat = apply_rules(rules, to_numpy(state_dict), ignore=ignore, what=what)
  check_params(flat, model_config)
  return model_config, nest(flat)


def encoder_rules(mm: str, src: str, depth: int, num_heads: int, names: Mapping[str, str], fused: bool,
                  final_norm: str) -> list[Rule]:
  """Pre-LN blocks `{mm}/encoderblock_i` from `{src}.i.<names>` plus the final LayerNorm.

  `names` gives the source sub-module names of ln1, attn, ln2, fc1 and fc2.
  """
  rules = []
  for i in range(depth):
    b, s = f"{mm}/encoderblock_{i}", f"{src}.{i}"
    rules += layer_norm(f"{b}/LayerNorm_0", f"{s}.{names['ln1']}")
    rules += attention(f"{b}/MultiHeadDotProductAttention_0", f"{s}.{names['attn']}", num_heads, fused)
    rules += layer_norm(f"{b}/LayerNorm_1", f"{s}.{names['ln2']}")
    rules += dense(f"{b}/MlpBlock_0/Dense_0", f"{s}.{names['fc1']}")
    rules += dense(f"{b}/MlpBlock_0/Dense_1", f"{s}.{names['fc2']}")
  return rules + layer_norm(f"{mm}/encoder_norm", final_norm)


def class_token_rule(class_embedding: str, positions: str) -> Rule:
  """CLIP's class token and [1 + patches] position table <-> mmjax's `cls`, `pos_embedding` and
  patch bias.

  CLIP adds a position to its class token and has no patch bias; mmjax (like big_vision)
  gives the class token no position and the patches a bias. The class token's position is
  folded into `cls`, and on export the patch bias is folded into the patch positions.
  """
  def to_mm(cls, pos):
    return (cls + pos[0])[None, None], pos[None, 1:], np.zeros_like(cls)

  def to_src(cls, pos, bias):
    return cls[0, 0], np.concatenate([np.zeros_like(pos[0, :1]), pos[0] + bias])

  return Rule(("img/cls", "img/pos_embedding", "img/embedding/bias"), (class_embedding, positions),
              to_mm, to_src)


def model_config(*, image: dict, text: dict, embed_dim: int, image_size: int, temperature_init: float,
                 bias_init: float | None, max_patches: int | None = None) -> dict:
  """A complete `config.model` dict for `mmjax.models.build`, towers on mmjax's defaults; a NaFlex
  image tower's images take `max_patches` patches each."""
  base = base_config().model.to_dict()
  towers = {side: {**base[side], **overrides} for side, overrides in (("image", image), ("text", text))}
  out = {**base, **towers, "embed_dim": int(embed_dim), "image_size": int(image_size),
         "temperature_init": float(temperature_init), "bias_init": None if bias_init is None else float(bias_init)}
  if image.get("naflex"):
    if not max_patches or max_patches < 1:
      raise ConversionError(f"a NaFlex image tower needs a patch budget per image; got max_patches={max_patches}")
    out["max_patches"] = int(max_patches)
  return out
