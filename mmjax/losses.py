"""Contrastive losses: SigLIP's pairwise sigmoid, CLIP's symmetric softmax, InfoNCE with K
negatives and the hinge triplet loss.

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
  return jax.shard_map(local, mesh=_shard_mesh(mesh), in_specs=specs, out_specs=P())(*args)


def softmax_loss(zimg, ztxt, t, *, mesh=None, positives=None):
  """CLIP: mean of the image→text and text→image cross-entropies of logits t·zimg·ztxtᵀ.

  With `positives`, a row's target is uniform over its positives (diagonal included),
  likewise for columns in the text→image direction. Returns a float32 scalar.
  """
  x, y, positives = _check_inputs(zimg, ztxt, positives)
  row_sum = lambda q, keys, offset, pos, t: _softmax_sum(q, keys, t, offset, pos)
  return _symmetric_mean(row_sum, x, y, (_scalar(t),), mesh, positives)


def infonce_loss(zimg, ztxt, t, *, num_negatives=None, mesh=None):
  """InfoNCE with K negatives per anchor, in both directions (image→text and text→image).

  The anchor at global row i is scored against its pair and the K rows after it,
  (i+1 … i+K) mod B, of the other modality: −log softmax(t·s)[pair] averaged over the
  2B anchors. The batch is shuffled, so these are random negatives; K = B−1 (the default,
  `num_negatives=None`) is CLIP's softmax loss.
  """
  x, y, _ = _check_inputs(zimg, ztxt, None)
  k = _negatives(num_negatives, x.shape[0])

  def row_sum(q, keys, offset, _, t):
    pair, negatives = _pair_and_negatives(q @ keys.T, offset, k)
    logits = t * jnp.concatenate([pair[:, None], negatives], axis=1)
    return jnp.sum(jax.nn.logsumexp(logits, axis=1) - logits[:, 0])

  return _symmetric_mean(row_sum, x, y, (_scalar(t),), mesh)


def triplet_loss(zimg, ztxt, *, margin=0.2, num_negatives=None, hardest=False, mesh=None):
  """Bidirectional hinge triplet loss on cosine similarities (VSE++ with `hardest=True`).

  Per anchor at global row i, with s its similarities to the other modality:
  Σₖ max(0, margin − s[i] + s[(i+k) mod B]) over k = 1 … K, or the max over k when
  `hardest`; averaged over the 2B anchors. K = B−1 by default (`num_negatives=None`).
  """
  x, y, _ = _check_inputs(zimg, ztxt, None)
  k = _negatives(num_negatives, x.shape[0])

  def row_sum(q, keys, offset, _, margin):
    pair, negatives = _pair_and_negatives(q @ keys.T, offset, k)
    hinge = jax.nn.relu(margin - pair[:, None] + negatives)
    return jnp.sum(jnp.max(hinge, axis=1) if hardest else hinge)

  return _symmetric_mean(row_sum, x, y, (_scalar(margin),), mesh)


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


def _shard_mesh(mesh):
  """The mesh in scope, which may name the device kind being compiled for
  (`parallel.compile_for`), else `mesh`. The trainer's mesh is the one in scope; a loss called
  under another mesh than the one it is given shards over the one in scope."""
  context = jax.sharding.get_abstract_mesh()
  return mesh if context.empty else context


def _num_shards(mesh, axes, batch):
  size = axes_size(mesh, axes)
  if batch % size:
    raise ConfigError(f"batch size {batch} is not divisible by D={size}, the number of "
                      f"devices on the batch axes {axes}")
  return size


def _negatives(num_negatives, batch):
  """K, the negatives per anchor: `num_negatives`, or all B−1 other rows when None."""
  k = batch - 1 if num_negatives is None else num_negatives
  if not 1 <= k <= batch - 1:
    raise ConfigError(f"num_negatives={num_negatives} must be in [1, B−1] = [1, {batch - 1}] for batch {batch}")
  return k


def _pair_and_negatives(sims, offset, k):
  """From a [b, B] block whose row r is global row offset+r: its pair's column and the next k columns (cyclic)."""
  rows = offset + jnp.arange(sims.shape[0])
  cols = (rows[:, None] + jnp.arange(k + 1)) % sims.shape[1]
  picked = jnp.take_along_axis(sims, cols, axis=1)
  return picked[:, 0], picked[:, 1:]


def _symmetric_mean(row_sum, x, y, scalars, mesh, positives=None):
  """(Σ over image anchors + Σ over text anchors) / 2B, where `row_sum(anchors, keys, offset, pos, *scalars)`
  sums the losses of a block of anchor rows (global rows offset…) against all B keys of the other modality.

  On a mesh, each device takes its own rows as anchors against the all-gathered other side."""
  batch = x.shape[0]
  positives_t = None if positives is None else positives.T
  axes = () if mesh is None else batch_axes(mesh)
  if not axes:
    return (row_sum(x, y, 0, positives, *scalars) + row_sum(y, x, 0, positives_t, *scalars)) / (2 * batch)
  _num_shards(mesh, axes, batch)

  def local(x, y, pos, pos_t, *scalars):
    offset = jax.lax.axis_index(axes) * x.shape[0]
    x_all = jax.lax.all_gather(x, axes, tiled=True)
    y_all = jax.lax.all_gather(y, axes, tiled=True)
    total = row_sum(x, y_all, offset, pos, *scalars) + row_sum(y, x_all, offset, pos_t, *scalars)
    return jax.lax.psum(total, axes) / (2 * batch)

  pos_spec = None if positives is None else P(axes)
  specs = (P(axes), P(axes), pos_spec, pos_spec) + (P(),) * len(scalars)
  return jax.shard_map(local, mesh=_shard_mesh(mesh), in_specs=specs, out_specs=P())(x, y, positives, positives_t,
                                                                                  *scalars)


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
