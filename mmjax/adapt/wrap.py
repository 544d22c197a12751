"""Adapted models: a base linen module plus the parameters of one adaptation method.

`wrap(model, config.adapt)` returns an object with the module's `init`/`apply` interface
(and its attributes), whose parameters are `{"base": <the module's>, "adapter": <the method's>}`,
so every task, the trainer, checkpoints and generation work unchanged. `config.adapt`:

  method   "lora"    low-rank updates of the targeted kernels (`mmjax.adapt.lora`)
           "adapter" a bottleneck MLP with a residual after each targeted module's output:
                     y + up(act(down(y))), `up` zero-initialised (Houlsby / Pfeiffer adapters)
           "prefix"  learned virtual tokens per targeted attention layer, read through the
                     layer's own key/value projections and attended through a separate softmax
                     whose output is scaled by tanh(gate), gate zero-initialised per head
                     (LLaMA-Adapter's zero-init attention; target only the first block for
                     tokens at the input, every block for per-layer prefixes)
           "shift"   a vector added to each targeted module's output at every position, zero at
                     init: the in-context vectors of `mmjax.adapt.icv` (extracted or trained)
  targets  [(regex, size), ...] over parameter paths (lora: rank) or module paths (adapter:
           bottleneck width; prefix: number of tokens; shift: any size > 0), first match wins,
           size 0 skips
  alpha, dropout (lora), act (adapter)

Every method leaves the base model's outputs unchanged at initialisation. Training only the
adapter means `optim.frozen` holds "^base/" (or rules for parts of the base; the recipes set it,
`wrap_for_task` enforces it).
Adapter and prefix modules are found by intercepting module calls (`nn.intercept_methods`), so
the model files know nothing of them; a module run under `nn.scan` is one module for all layers.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import rules
from mmjax.adapt import lora
from mmjax.config import as_dict
from mmjax.errors import ConfigError
from mmjax.models.decoder import apply_rope
from mmjax.ops.attention import dot_product_attention

METHODS = ("lora", "adapter", "prefix", "shift")
BASE, ADAPTER = "base", "adapter"
_ACTS = {"gelu": nn.gelu, "relu": nn.relu, "silu": nn.silu}


def wrap(model, adapt_config):
  """`model` itself when `adapt_config` is empty or None, else an `Adapted` model."""
  if not adapt_config or not adapt_config.get("method"):
    return model
  return Adapted(model, as_dict(adapt_config))


def wrap_for_task(model, config, model_config: dict):
  """A task's model under `config.adapt`: checks that `config.optim` freezes the base (or named
  parts of it: `^base/lm/` when LLaVA trains its projector beside LoRA on the LM) and records the
  adaptation in the task's `model_config`, from which exports rebuild the adapted model."""
  if config.adapt.method:
    if not any(r.lstrip("^").startswith(f"{BASE}/") for r in config.optim.frozen):
      raise ConfigError(f"adapt.method={config.adapt.method!r} trains the adapter: add r'^{BASE}/' (or rules "
                        f"for parts of it) to optim.frozen (now {list(config.optim.frozen)})")
    model_config["adapt"] = config.adapt.to_dict()
  return wrap(model, config.adapt)


def _targets(cfg: dict) -> list[tuple[str, int]]:
  targets = [tuple(t) for t in cfg.get("targets", ())]
  if not targets:
    raise ConfigError(f"adapt.targets is empty: give [(regex, size), ...] for adapt.method={cfg['method']!r}")
  return targets


def _module_path(context) -> str:
  return "/".join(context.module.path)


def _nested_set(tree: dict, path: str, value) -> None:
  *parents, last = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[last] = value


def _nested_get(tree: dict, path: str):
  for p in path.split("/"):
    tree = tree[p]
  return tree


class Adapted:
  """A base module with an adaptation method; see the module docstring."""

  def __init__(self, base, cfg: dict):
    if cfg.get("method") not in METHODS:
      raise ConfigError(f"adapt.method={cfg.get('method')!r}; known: {list(METHODS)}")
    self.base, self.cfg, self.method = base, cfg, cfg["method"]
    self.targets = _targets(cfg)
    self._size = rules.matcher(self.targets, 0, what="adapt.targets")
    if self.method == "adapter" and cfg.get("act", "gelu") not in _ACTS:
      raise ConfigError(f"adapt.act={cfg.get('act')!r}; known: {sorted(_ACTS)}")

  def __getattr__(self, name):  # The base module's fields (token ids, widths) and helper methods.
    if name == "base":  # Not set yet (copying, unpickling): no recursion.
      raise AttributeError(name)
    return getattr(self.base, name)

  @property
  def lora_scale(self) -> float:
    ranks = {size for _, size in self.targets if size}
    if len(ranks) != 1:
      raise ConfigError(f"adapt.targets give ranks {sorted(ranks)}; LoRA's alpha/rank scale needs one rank")
    rank = ranks.pop()
    return float(self.cfg.get("alpha") or rank) / rank

  # init / apply --------------------------------------------------------------------------

  def init(self, rngs, *args, **kwargs):
    base_rng, adapter_rng = jax.random.split(rngs if not isinstance(rngs, dict) else rngs["params"])
    if self.method == "lora":
      params = self.base.init(base_rng, *args, **kwargs)["params"]
      return {"params": {BASE: params, ADAPTER: lora.init(params, self.targets, adapter_rng)}}
    seen: dict[str, Any] = {}

    def record(next_fun, a, kw, context):
      out = next_fun(*a, **kw)
      path = _module_path(context)
      if context.method_name == "__call__" and self._size(path):
        seen[path] = (context.module, a[0].shape[-1])
      return out

    with nn.intercept_methods(record):
      params = self.base.init(base_rng, *args, **kwargs)["params"]
    if not seen:
      raise ConfigError(f"adapt.targets={self.targets} match no module path; paths look like "
                        "'txt/Encoder_0/encoderblock_0/MlpBlock_0'")
    adapter: dict = {}
    for key, (path, (module, width)) in zip(jax.random.split(adapter_rng, len(seen)), sorted(seen.items())):
      size = self._size(path)
      _nested_set(adapter, path, self._new_params(key, module, path, width, size))
    return {"params": {BASE: params, ADAPTER: adapter}}

  def _new_params(self, key, module, path: str, width: int, size: int) -> dict:
    box = nn.LogicallyPartitioned
    if self.method == "adapter":
      return {"down": box(jax.random.normal(key, (width, size)) * width ** -0.5, names=("embed", None)),
              "down_bias": box(jnp.zeros((size,)), names=(None,)),
              "up": box(jnp.zeros((size, width)), names=(None, "embed")),
              "up_bias": box(jnp.zeros((width,)), names=("embed",))}
    if self.method == "shift":
      return {"vector": box(jnp.zeros((width,)), names=("embed",))}
    heads = getattr(module, "num_heads", None)
    if heads is None or not hasattr(module, "attention_impl"):
      raise ConfigError(f"adapt.method='prefix' targets attention modules; {path} "
                        f"({type(module).__name__}) is not one")
    return {"tokens": box(jax.random.normal(key, (size, width)) * 0.02, names=(None, "embed")),
            "gate": box(jnp.zeros((heads,)), names=(None,))}

  def apply(self, variables, *args, rngs=None, **kwargs):
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    if self.method == "lora":
      train = kwargs.get("train", False)
      rng = rngs.get("dropout") if (train and isinstance(rngs, dict)) else None
      base = lora.apply(params[BASE], params[ADAPTER], scale=self.lora_scale,
                        dropout=float(self.cfg.get("dropout", 0.0)), rng=rng)
      return self.base.apply({**rest, "params": base}, *args, rngs=rngs, **kwargs)
    with nn.intercept_methods(self._interceptor(params[ADAPTER])):
      return self.base.apply({**rest, "params": params[BASE]}, *args, rngs=rngs, **kwargs)

  def merged(self, params) -> dict:
    """Plain base-module parameters with a LoRA update folded in (for `self.base.apply`)."""
    if self.method != "lora":
      raise ConfigError(f"adapt.method={self.method!r} adds computation; only 'lora' merges into the weights")
    return lora.merge(params[BASE], params[ADAPTER], scale=self.lora_scale)

  # interception --------------------------------------------------------------------------

  def _interceptor(self, adapter: dict):
    act = _ACTS[self.cfg.get("act", "gelu")]

    def intercept(next_fun, a, kw, context):
      out = next_fun(*a, **kw)
      if context.method_name != "__call__":
        return out
      path = _module_path(context)
      if not self._size(path):
        return out
      p = _nested_get(adapter, path)
      y, *extra = out if isinstance(out, tuple) else (out,)
      if self.method == "adapter":
        h = act(y.astype(jnp.float32) @ p["down"] + p["down_bias"])
        y = y + (h @ p["up"] + p["up_bias"]).astype(y.dtype)
      elif self.method == "shift":
        y = y + p["vector"].astype(y.dtype)
      else:
        y = y + _prefix_attention(context.module, p, a, kw).astype(y.dtype)
      return (y, *extra) if isinstance(out, tuple) else y

    return intercept


def _prefix_attention(module, p: dict, args: tuple, kwargs: dict) -> jax.Array:
  """tanh(gate) · out(softmax(q·kᵀ/√d)·v) with q from the layer's input and k, v from the
  prefix tokens, through the layer's own projections (RoPE on q when the layer uses it), the
  softmax through the attention door with the layer's `attention_impl`."""
  w = module.variables["params"]
  x = args[0].astype(jnp.float32)

  def proj(name, inputs):
    y = jnp.einsum("...d,dhk->...hk", inputs, w[name]["kernel"].astype(jnp.float32))
    return y + w[name]["bias"] if "bias" in w[name] else y

  q = proj("query", x)
  if getattr(module, "rope_theta", None) is not None:
    q = apply_rope(q, args[1], module.rope_theta)
  # The prefix's keys and values [tokens, kv heads, head_dim], the same for every example.
  k, v = (jnp.broadcast_to(t, (q.shape[0], *t.shape)) for t in (proj("key", p["tokens"]), proj("value", p["tokens"])))
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  y = dot_product_attention(q, k, v, impl=module.attention_impl) * jnp.tanh(p["gate"])[:, None]
  return jnp.einsum("blhk,hkd->bld", y, w["out"]["kernel"].astype(jnp.float32))


def count(params) -> int:
  """Trainable (adapter) parameter count of an adapted parameter tree."""
  return sum(x.size for x in jax.tree.leaves(params[ADAPTER]))


__all__ = ["wrap", "wrap_for_task", "Adapted", "count", "METHODS"]
