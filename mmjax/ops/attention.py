"""The one door every attention in mmjax goes through.

Layout is `[batch, seq, heads, head_dim]`; a boolean `mask` broadcastable to
`[batch, heads, q_len, kv_len]` marks the pairs that may attend (True = attend), and
segment ids (`q_segment_ids` [batch, q_len] with `kv_segment_ids` [batch, kv_len]: packed
sequences) let a query attend only to keys of its own segment.
A query row with nothing to attend to outputs zeros on every path.
"""
from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from mmjax import parallel
from mmjax.errors import ConfigError
from mmjax.ops.cudnn_attention import cudnn_attention
from mmjax.ops.flash_attention import flash_attention

IMPLS = ("xla", "cudnn", "pallas")
# Logical names of the [batch, seq, heads, head_dim] activations, resolved by the config's rules.
ACTIVATION_AXES = ("act_batch", None, "heads", None)
_warned: set[str] = set()


def dot_product_attention(q, k, v, *, bias=None, mask=None, causal=False, q_segment_ids=None,
                          kv_segment_ids=None, impl="xla"):
  """Softmax(q·kᵀ/√d + bias, masked) · v, with softmax statistics in float32."""
  if impl not in IMPLS:
    raise ConfigError(f"attention impl={impl!r} is not one of {IMPLS}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ConfigError("dot_product_attention: pass q_segment_ids and kv_segment_ids together")
  if impl == "pallas":
    kv_mask, unsupported = _key_padding(mask, q.shape[0], k.shape[1])
    if bias is not None:
      unsupported = "an additive bias"
    if unsupported is None:
      segments = () if q_segment_ids is None else (q_segment_ids, kv_segment_ids)
      out = _sharded_flash(q, k, v, kv_mask, segments, causal)
      if out is not None:
        return out
      unsupported = f"batch {q.shape[0]} / {q.shape[2]} heads that do not split evenly over the mesh"
    warn_once(f"attention impl='pallas' does not support {unsupported}; using impl='xla' for it")
    impl = "xla"
  if q_segment_ids is not None:
    same = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
    mask = same if mask is None else jnp.logical_and(mask, same)
  if impl == "cudnn" and parallel.target_platform() == "gpu":  # Elsewhere: the xla path below.
    out, unsupported = cudnn_attention(q, k, v, bias=bias, mask=mask, causal=causal)
    if unsupported is None:
      if jnp.result_type(q, k, v) == jnp.float32:
        warn_once("attention impl='cudnn' computes float32 inputs in bfloat16 (cuDNN has no float32 kernel)")
      return out
    warn_once(f"attention impl='cudnn' does not support {unsupported}; using impl='xla' for it")
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if causal:
    q_len, kv_len = q.shape[1], k.shape[1]
    # Queries are aligned to the end of the keys, as when decoding with a cache.
    allowed = jnp.tril(jnp.ones((q_len, kv_len), bool), k=kv_len - q_len)
    mask = allowed if mask is None else jnp.logical_and(mask, allowed)
  # Masked entries get probability 0, so a row with no key to attend to outputs zeros.
  probs = jax.nn.softmax(logits, axis=-1, where=mask)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def _key_padding(mask, batch: int, kv_len: int):
  """`(kv_mask [batch, kv_len] or None, None)` when `mask` only masks keys per example,
  else `(None, description of what the kernel cannot take)`."""
  if mask is None:
    return None, None
  mask = jnp.asarray(mask)
  if mask.ndim > 4:
    raise ConfigError(f"attention mask has shape {mask.shape}; expected at most 4 dims [batch, heads, q, kv]")
  shape = (1,) * (4 - mask.ndim) + mask.shape
  if shape[1] != 1 or shape[2] != 1:
    return None, f"a mask of shape {mask.shape} (only key-padding masks [batch, 1, 1, kv_len] run in the kernel)"
  return jnp.broadcast_to(mask.reshape(shape[0], shape[3]), (batch, kv_len)), None


def warn_once(message: str):
  """Warns once per process for each distinct message."""
  if message not in _warned:
    _warned.add(message)
    warnings.warn(message, stacklevel=3)


def _sharded_flash(q, k, v, kv_mask, segments, causal):
  """The kernel, per device under a mesh: shard_map over the batch and heads axes that the
  logical axis rules assign to the activations (a kernel cannot be auto-partitioned).
  `segments`: `()` or `(q_segment_ids, kv_segment_ids)`.

  Returns None when the shapes do not split evenly over those axes."""
  mask_args = () if kv_mask is None else (kv_mask,)
  batch = q.shape[0]
  segments = tuple(jnp.broadcast_to(s, (batch, n)) for s, n in zip(segments, (q.shape[1], k.shape[1])))

  def run(q, k, v, *rest):
    kv_mask = rest[0] if mask_args else None
    seg = dict(zip(("q_segment_ids", "kv_segment_ids"), rest[len(mask_args):]))
    return flash_attention(q, k, v, causal=causal, kv_mask=kv_mask, **seg)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return run(q, k, v, *mask_args, *segments)
  batch_axes, _, head_axes, _ = nn.logical_to_mesh_axes(ACTIVATION_AXES)
  if batch_axes is None and head_axes is None:
    warn_once("attention impl='pallas' under a mesh without logical axis rules for 'act_batch' or "
               "'heads': every device computes the whole attention")
  for dim, axes in ((q.shape[0], batch_axes), (q.shape[2], head_axes)):
    if dim % parallel.axes_size(mesh, axes):
      return None
  specs = (P(batch_axes, None, head_axes, None),) * 3 + (P(batch_axes, None),) * (len(mask_args) + len(segments))
  args = (q, k, v) + mask_args + segments
  if any(t == AxisType.Explicit for t in mesh.axis_types):  # shard_map wants inputs laid out as its specs
    args = tuple(jax.sharding.reshard(x, spec) for x, spec in zip(args, specs))
  return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)
