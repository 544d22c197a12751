"""LoRA as a transformation of a parameter tree: W' = W + (alpha / r) · A·B.

`init` picks the targeted kernels by regex rules over parameter paths (`[(regex, rank), ...]`,
first match wins, rank 0 or None: not adapted) and returns a tree that mirrors the base
tree down to each targeted kernel, holding `{"a": A, "b": B}` there. `A` is Gaussian and
`B` zero, so `apply(base, lora)` equals `base` at initialisation. A kernel of any rank is
seen as a matrix [fan-in axes, fan-out axes]: `A` has the kernel's fan-in axes and the rank,
`B` the rank and its fan-out axes, and `A·B` contracts the rank. The fan-in axes follow the
logical axis names: a kernel whose last axis is `embed` writes into the residual stream and
has every other axis as fan-in (attention `out`, the patch embedding); any other kernel has
only its first axis (`query`, MLP `Dense_0`).

Dropout (`dropout > 0` and an rng) drops fan-in features of the low-rank path: as the update is
applied to the weights, one mask per step is shared by the whole batch rather than drawn per example.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import rules
from mmjax.errors import ConfigError

A, B = "a", "b"


def _fan_in_axes(names: Sequence[str | None] | None, shape: tuple[int, ...], path: str) -> int:
  if len(shape) < 2:
    raise ConfigError(f"lora target {path} has shape {shape}; LoRA adapts matrices and kernels (ndim >= 2)")
  if len(shape) == 2:
    return 1
  if names is None:
    raise ConfigError(f"lora target {path} has shape {shape}: pass parameters boxed with their logical axis "
                      "names (as `model.init` returns them) so its fan-in axes are known")
  return len(shape) - 1 if names[-1] == "embed" else 1


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def init(params, targets: Sequence[tuple[str, Any]], rng: jax.Array, *, init_scale: float | None = None):
  """The LoRA tree for `params` (boxed or plain). `A ~ N(0, init_scale²)` (default 1/sqrt(fan-in)),
  `B = 0`. Boxed inputs give boxed outputs, so the factors are sharded like their kernel's axes."""
  plain = jax.tree.map(lambda x: x.value if _is_box(x) else x, params, is_leaf=_is_box)
  rank_leaves = jax.tree.leaves(rules.match(list(targets), plain, 0, what="adapt.targets"))
  flat = jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_box)
  out: dict = {}
  keys = jax.random.split(rng, max(len(flat), 1))
  for key, (path, leaf), rank in zip(keys, flat, rank_leaves):
    if not rank:
      continue
    name = rules.path_str(path)
    names = leaf.names if _is_box(leaf) else None
    value = leaf.value if _is_box(leaf) else leaf
    k = _fan_in_axes(names, value.shape, name)
    std = init_scale if init_scale is not None else math.prod(value.shape[:k]) ** -0.5
    a = std * jax.random.normal(key, value.shape[:k] + (int(rank),), jnp.float32)
    b = jnp.zeros((int(rank),) + value.shape[k:], jnp.float32)
    if names is not None:
      a = leaf.replace(value=a, names=tuple(names[:k]) + (None,))
      b = leaf.replace(value=b, names=(None,) + tuple(names[k:]))
    node = out
    for p in path[:-1]:
      node = node.setdefault(_key(p), {})
    node[_key(path[-1])] = {A: a, B: b}
  if not out:
    paths = [rules.path_str(p) for p, _ in flat]
    examples = [p for p in paths if p.endswith("kernel")][:2] or paths[:2]
    raise ConfigError(f"adapt.targets={list(targets)} match no parameter; paths look like {examples}")
  return out


def _key(p) -> str:
  return str(getattr(p, "key", getattr(p, "name", p)))


def _delta(factors: dict, scale: float, mask=None) -> jax.Array:
  a = factors[A] if mask is None else factors[A] * mask
  return jnp.tensordot(a, factors[B], axes=1) * scale


def _combine(base, lora, fn):
  """`base` with `fn(leaf, factors)` at every leaf that `lora` adapts."""
  if isinstance(lora, dict) and set(lora) == {A, B} and not isinstance(base, dict):
    return fn(base, lora)
  if not isinstance(base, dict) or not isinstance(lora, dict):
    raise ConfigError(f"lora tree does not fit the parameters (at {type(base).__name__})")
  missing = set(lora) - set(base)
  if missing:
    raise ConfigError(f"lora tree adapts {sorted(missing)}, which the parameters lack; they have {sorted(base)}")
  return {k: (_combine(v, lora[k], fn) if k in lora else v) for k, v in base.items()}


def apply(base, lora, *, scale: float, dropout: float = 0.0, rng: jax.Array | None = None):
  """The adapted parameters W + scale · A·B (`scale` = alpha / rank), computed in float32 and
  cast to each kernel's dtype. With `dropout` and `rng`, fan-in rows of A are dropped."""
  counter = iter(range(1 << 30))

  def add(w, factors):
    mask = None
    if dropout and rng is not None:
      keep = jax.random.bernoulli(jax.random.fold_in(rng, next(counter)), 1.0 - dropout,
                                  factors[A].shape[:-1] + (1,))
      mask = keep.astype(jnp.float32) / (1.0 - dropout)
    return (w.astype(jnp.float32) + _delta(factors, scale, mask)).astype(w.dtype)

  return _combine(base, lora, add)


def merge(base, lora, *, scale: float):
  """The base parameters with the update folded in: a plain model, no LoRA at inference."""
  return apply(base, lora, scale=scale)


def unmerge(merged, lora, *, scale: float):
  """The inverse of `merge`: the base parameters back (to float32 rounding)."""
  return _combine(merged, lora, lambda w, f: (w.astype(jnp.float32) - _delta(f, scale)).astype(w.dtype))


def count(lora) -> int:
  return sum(x.size for x in jax.tree.leaves(nn.unbox(lora)))
