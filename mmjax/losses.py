"""Contrastive losses: SigLIP's pairwise sigmoid and CLIP's symmetric softmax.

Embeddings are global `[B, D]` arrays split along the batch over the mesh's batch
axes (`parallel.batch_axes`), b = B / devices rows per device. The sigmoid loss has
three implementations that agree to float32 tolerance:

- `ring`: each device keeps its images while the text blocks travel around the
  devices with `ppermute`; a custom VJP re-rotates and recomputes each b×b block, so
  per-device memory is O(b²) in forward and backward.
- `all_gather`: gathers the text, b×B logits per device.
- `dense`: the full B×B logits, for comparison.

`positives`, an optional global `[B, B]` boolean matrix, marks positive pairs in
addition to the diagonal (e.g. images whose captions are identical).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mmjax.errors import ConfigError
from mmjax.parallel import axes_size, batch_axes

SIGMOID_IMPLS = ("ring", "all_gather", "dense")


def sigmoid_loss(zimg, ztxt, t, b, *, mesh=None, impl="ring", positives=None):
  """SigLIP: −(1/B)·Σᵢⱼ log σ(zᵢⱼ·(t·xᵢ·yⱼ + b)), zᵢⱼ = +1 for positive pairs, −1 otherwise.

  `t` is the (already exponentiated) scale and `b` the bias, each a scalar or shape (1,).
  Without a mesh, or on a mesh without batch axes, every impl computes the dense formula.
  Returns the global loss as a float32 scalar.
  """
  if impl not in SIGMOID_IMPLS:
    raise ConfigError(f"sigmoid_loss impl={impl!r} is not one of {SIGMOID_IMPLS}")
  x, y, positives = _check_inputs(zimg, ztxt, positives)
  t, bias = _scalar(t), _scalar(b)
  batch = x.shape[0]
  axes = () if mesh is None else batch_axes(mesh)
  if impl == "dense" or not axes:
    return -_sigmoid_sum(x, y, t, bias, 0, positives) / batch
  size = _num_shards(mesh, axes, batch)

  if impl == "ring":
    ring = _Ring(axes, size, batch)
    local = functools.partial(_ring_sigmoid, ring)
  else:
    def local(x, y, t, bias, pos=None):
      offset = jax.lax.axis_index(axes) * x.shape[0]
      y_all = jax.lax.all_gather(y, axes, tiled=True)
      return -jax.lax.psum(_sigmoid_sum(x, y_all, t, bias, offset, pos), axes) / batch

  args, specs = (x, y, t, bias), (P(axes), P(axes), P(), P())
  if positives is not None:
    args, specs = args + (positives,), specs + (P(axes),)
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(*args)


def softmax_loss(zimg, ztxt, t, *, mesh=None, positives=None):
  """CLIP: mean of the image→text and text→image cross-entropies of logits t·zimg·ztxtᵀ.

  With `positives`, a row's target is uniform over its positives (diagonal included),
  likewise for columns in the text→image direction. Returns a float32 scalar.
  """
  x, y, positives = _check_inputs(zimg, ztxt, positives)
  t = _scalar(t)
  batch = x.shape[0]
  positives_t = None if positives is None else positives.T
  axes = () if mesh is None else batch_axes(mesh)
  if not axes:
    total = _softmax_sum(x, y, t, 0, positives) + _softmax_sum(y, x, t, 0, positives_t)
    return total / (2 * batch)
  _num_shards(mesh, axes, batch)

  def local(x, y, t, pos=None, pos_t=None):
    offset = jax.lax.axis_index(axes) * x.shape[0]
    x_all = jax.lax.all_gather(x, axes, tiled=True)
    y_all = jax.lax.all_gather(y, axes, tiled=True)
    total = _softmax_sum(x, y_all, t, offset, pos) + _softmax_sum(y, x_all, t, offset, pos_t)
    return jax.lax.psum(total, axes) / (2 * batch)

  args, specs = (x, y, t), (P(axes), P(axes), P())
  if positives is not None:
    args, specs = args + (positives, positives_t), specs + (P(axes), P(axes))
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(*args)


def next_token_loss(logits, targets, weights):
  """Weighted mean cross-entropy of `targets` [batch, seq] under `logits` [batch, seq, vocab]:
  sum(w * nll) / sum(w) over the whole (global) batch, in float32; 0 when no weight is set."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _check_inputs(zimg, ztxt, positives):
  if zimg.ndim != 2 or zimg.shape != ztxt.shape:
    raise ConfigError(f"zimg {zimg.shape} and ztxt {ztxt.shape} must both be [B, D] "
                      "with the same shape")
  batch = zimg.shape[0]
  if positives is not None:
    if positives.shape != (batch, batch):
      raise ConfigError(f"positives has shape {positives.shape}; expected [B, B] = "
                        f"{(batch, batch)}")
    positives = positives.astype(bool)
  return zimg.astype(jnp.float32), ztxt.astype(jnp.float32), positives


def _scalar(v):
  return jnp.reshape(jnp.asarray(v, jnp.float32), ())


def _num_shards(mesh, axes, batch):
  size = axes_size(mesh, axes)
  if batch % size:
    raise ConfigError(f"batch size {batch} is not divisible by D={size}, the number of "
                      f"devices on the batch axes {axes}")
  return size


def _labels(shape, diag_offset, pos):
  """±1 labels of a logits block: +1 on the diagonal shifted by `diag_offset` and where `pos`."""
  rows = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  positive = cols == rows + diag_offset
  if pos is not None:
    positive = positive | pos
  return jnp.where(positive, 1.0, -1.0)


def _sigmoid_sum(x, y, t, bias, diag_offset, pos):
  """Σ log σ(z·(t·x·yᵀ + bias)) over one block of pairs."""
  logits = t * (x @ y.T) + bias
  z = _labels(logits.shape, diag_offset, pos)
  return jnp.sum(jax.nn.log_sigmoid(z * logits))


def _sigmoid_grads(x, y, t, bias, diag_offset, pos, coef):
  """Gradients of coef·Σ log σ(z·(t·x·yᵀ + bias)) w.r.t. x, y, t and bias."""
  sims = x @ y.T
  z = _labels(sims.shape, diag_offset, pos)
  g = coef * z * jax.nn.sigmoid(-z * (t * sims + bias))
  return t * (g @ y), t * (g.T @ x), jnp.sum(g * sims), jnp.sum(g)


def _softmax_sum(q, keys, t, diag_offset, pos):
  """Σ over the rows of q of the cross-entropy of softmax(t·q·keysᵀ) against the positives."""
  logits = t * (q @ keys.T)
  lse = jax.nn.logsumexp(logits, axis=1)
  if pos is None:
    target = jnp.arange(q.shape[0]) + diag_offset
    positive_logit = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
  else:
    mask = _labels(logits.shape, diag_offset, pos) > 0
    positive_logit = jnp.sum(jnp.where(mask, logits, 0.0), axis=1) / jnp.sum(mask, axis=1)
  return jnp.sum(lse - positive_logit)


class _Ring(NamedTuple):
  axes: tuple[str, ...]
  size: int
  batch: int


def _rotate(ring, tree):
  """Sends to the next device on the ring; after k rotations device i holds device i−k's block."""
  perm = [(i, (i + 1) % ring.size) for i in range(ring.size)]
  return jax.lax.ppermute(tree, ring.axes, perm)


def _owner_cols(ring, pos, k):
  """Columns of this device's positives row-block that belong to the text held at step k."""
  if pos is None:
    return None
  block = pos.shape[0]
  owner = (jax.lax.axis_index(ring.axes) - k) % ring.size
  return jax.lax.dynamic_slice_in_dim(pos, owner * block, block, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_sigmoid(ring, x, y, t, bias, pos=None):
  return _ring_fwd(ring, x, y, t, bias, pos)[0]


def _diag_offset(k, block):
  """The diagonal is only in step 0's block; offset `block` puts it outside the block."""
  return jnp.where(k == 0, 0, block)


# Both passes run all D steps in one loop that computes on the held text block while
# sending it on (the last hop is spare), so XLA keeps one b×b block alive whatever D is.
def _ring_fwd(ring, x, y, t, bias, pos=None):
  def step(k, carry):
    y_k, total = carry
    block = _sigmoid_sum(x, y_k, t, bias, _diag_offset(k, x.shape[0]), _owner_cols(ring, pos, k))
    return _rotate(ring, y_k), total + block

  _, total = jax.lax.fori_loop(0, ring.size, step, (y, jnp.zeros_like(x, shape=())))
  loss = -jax.lax.psum(total, ring.axes) / ring.batch
  return loss, (x, y, t, bias, pos)


def _ring_bwd(ring, res, g):
  x, y, t, bias, pos = res
  coef = -g / ring.batch

  # The d(text) accumulator travels with its text block, collecting every device's share;
  # after D hops it is back at the block's owner.
  def step(k, carry):
    y_k, dy, dx, dt, dbias = carry
    gx, gy, gt, gb = _sigmoid_grads(x, y_k, t, bias, _diag_offset(k, x.shape[0]),
                                    _owner_cols(ring, pos, k), coef)
    y_k, dy = _rotate(ring, (y_k, dy + gy))
    return y_k, dy, dx + gx, dt + gt, dbias + gb

  zero = jnp.zeros_like(x, shape=())
  init = (y, jnp.zeros_like(y), jnp.zeros_like(x), zero, zero)
  _, dy, dx, dt, dbias = jax.lax.fori_loop(0, ring.size, step, init)
  return dx, dy, jax.lax.psum(dt, ring.axes), jax.lax.psum(dbias, ring.axes), None


_ring_sigmoid.defvjp(_ring_fwd, _ring_bwd)
