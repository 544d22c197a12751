"""Flash attention in Pallas: blocked online softmax forward, recomputing backward.

Layout `[batch, seq, heads, head_dim]`, like the attention door. Memory is O(seq):
the forward keeps a running max and sum per query row (float32) and saves only the
output and the row logsumexp; the backward recomputes each probability block from
that logsumexp (one kernel for dq, one for dk and dv), so no [q, kv] matrix is ever
stored.

Masking happens inside the kernels through segment ids: query row r may attend to
key c iff `q_segment[r] == kv_segment[c]` (and `c <= r + kv_len - q_len` when causal,
queries aligned to the end of the keys as in the door). Key-padding masks and
per-example key lengths become kv segment -1 on the masked keys; padding added to
reach a block multiple is masked the same way. A query row with no allowed key
outputs zeros (the empty sum), as the door's `xla` path does.

On CPU the kernels run in Pallas interpret mode (chosen automatically). On GPU they
lower through the Triton backend, selected explicitly because JAX's default GPU
backend for `pallas_call` is Mosaic GPU (see docs/kernels.md).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mmjax.errors import ConfigError

# Finite stand-in for -inf: exp(MASK - max) underflows to 0, and fully masked rows stay finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_MIN_HEAD_DIM = 64  # Smaller head dims are zero-padded up to it; larger ones to a power of two.
# (block_q, block_k) per backend: GPU tiles sized for shared memory; in interpret mode
# larger blocks mean fewer interpreted grid steps.
DEFAULT_BLOCKS = {"gpu": (128, 64), "tpu": (128, 128), "cpu": (128, 128)}
_MIN_BLOCK = 16  # Triton's smallest tile for tl.dot.


def flash_attention(q, k, v, *, causal: bool = False, kv_mask=None, kv_lengths=None,
                    q_segment_ids=None, kv_segment_ids=None, block_q: int | None = None,
                    block_k: int | None = None, interpret: bool | None = None):
  """softmax(q·kᵀ/√d, masked)·v for q [B, Sq, H, D] and k, v [B, Sk, H, D].

  Masks (any combination): `kv_mask` bool [B, Sk] (True = attend), `kv_lengths` int [B]
  (keys at positions >= length are masked), or non-negative int segment ids
  `q_segment_ids` [B, Sq] with `kv_segment_ids` [B, Sk] (attend within a segment).
  Any Sq, Sk and D: inputs are padded to block multiples and the head dim to a power
  of two (at least 64), and the result is sliced back.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  if k.shape != (batch, kv_len, heads, head_dim) or v.shape != k.shape:
    raise ConfigError(f"flash_attention: q {q.shape}, k {k.shape}, v {v.shape}; expected q [B, Sq, H, D] "
                      "and k, v [B, Sk, H, D]")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ConfigError("flash_attention: pass q_segment_ids and kv_segment_ids together")
  backend = jax.default_backend()
  interpret = backend == "cpu" if interpret is None else interpret
  default_q, default_k = DEFAULT_BLOCKS.get(backend, DEFAULT_BLOCKS["gpu"])
  block_q = _fit_block(block_q or default_q, q_len, "block_q")
  block_k = _fit_block(block_k or default_k, kv_len, "block_k")

  if q_segment_ids is None:
    q_seg = jnp.zeros((batch, q_len), jnp.int32)
    kv_seg = jnp.zeros((batch, kv_len), jnp.int32)
  else:
    q_seg = jnp.broadcast_to(q_segment_ids, (batch, q_len)).astype(jnp.int32)
    kv_seg = jnp.broadcast_to(kv_segment_ids, (batch, kv_len)).astype(jnp.int32)
  if kv_mask is not None:
    kv_seg = jnp.where(jnp.broadcast_to(kv_mask, (batch, kv_len)), kv_seg, -1)
  if kv_lengths is not None:
    lengths = jnp.broadcast_to(jnp.asarray(kv_lengths, jnp.int32), (batch,))
    kv_seg = jnp.where(jnp.arange(kv_len)[None] < lengths[:, None], kv_seg, -1)

  padded_dim = _padded_head_dim(head_dim)
  q_pad, kv_pad = -q_len % block_q, -kv_len % block_k
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, padded_dim - head_dim)))
  q_seg = jnp.pad(q_seg, ((0, 0), (0, q_pad)))
  kv_seg = jnp.pad(kv_seg, ((0, 0), (0, kv_pad)), constant_values=-1)
  out = _flash(pad(q, q_pad), pad(k, kv_pad), pad(v, kv_pad), q_seg, kv_seg,
               _Static(scale=head_dim ** -0.5, causal=causal, offset=kv_len - q_len,
                       block_q=block_q, block_k=block_k, interpret=interpret))
  return out[:, :q_len, :, :head_dim]


def _fit_block(block: int, length: int, name: str) -> int:
  """The block size, shrunk to the sequence (rounded up to a power of two >= 16)."""
  if block < _MIN_BLOCK or block & (block - 1):
    raise ConfigError(f"flash_attention: {name}={block} must be a power of two >= {_MIN_BLOCK}")
  return min(block, max(_MIN_BLOCK, pl.next_power_of_2(length)))


def _padded_head_dim(head_dim: int) -> int:
  """64, 128, 256, ...: Triton tiles must be powers of two."""
  return max(_MIN_HEAD_DIM, pl.next_power_of_2(head_dim))


class _Static(NamedTuple):
  """Static kernel arguments (the custom_vjp's non-differentiable argument)."""
  scale: float
  causal: bool
  offset: int  # kv_len - q_len of the unpadded inputs: causal queries align to the last keys.
  block_q: int
  block_k: int
  interpret: bool


def _compiler_params(interpret: bool, head_dim: int):
  # Triton is named explicitly: JAX's default GPU backend for pallas_call is Mosaic GPU.
  if interpret or jax.default_backend() == "tpu":
    return None
  from jax.experimental.pallas import triton as pl_triton
  return pl_triton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


# Block ranges shared by forward and backward, so both visit exactly the same blocks.

def _kv_blocks_for(i, s: _Static, num_kv_blocks: int):
  """Number of kv blocks query block i visits: causal skips blocks entirely in its future
  (but always visits block 0, so every row's statistics are written)."""
  if not s.causal:
    return num_kv_blocks
  last = (i + 1) * s.block_q + s.offset  # Keys at positions < last may be visible.
  return jnp.clip(pl.cdiv(last, s.block_k), 1, num_kv_blocks)


def _first_q_block_for(j, s: _Static):
  """First query block that visits kv block j (the inverse of `_kv_blocks_for`)."""
  if not s.causal:
    return 0
  return jnp.where(j == 0, 0, jnp.maximum(0, (j * s.block_k - s.offset) // s.block_q))


def _matmul(a, b):
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _matmul_tn(a, b):
  """aᵀ·b without materialising the transpose."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _matmul_nt(a, b):
  """a·bᵀ without materialising the transpose."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _logits(q, k, q_seg, kv_seg, q_start, k_start, s: _Static):
  """Scaled, masked float32 logits of a [block_q, block_k] tile."""
  logits = _matmul_nt(q, k) * s.scale
  allowed = q_seg[:, None] == kv_seg[None, :]
  if s.causal:
    rows = q_start + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 0)
    cols = k_start + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    allowed = allowed & (cols <= rows + s.offset)
  return jnp.where(allowed, logits, MASK_VALUE)


# Forward --------------------------------------------------------------------------------

def _fwd_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, *, s: _Static):
  i = pl.program_id(2)
  q, q_seg = q_ref[...], q_seg_ref[...]
  block_q, dim = q.shape
  num_kv_blocks = k_ref.shape[0] // s.block_k

  def body(j, carry):
    m, l, acc = carry
    kv = pl.ds(j * s.block_k, s.block_k)
    logits = _logits(q, k_ref[kv, :], q_seg, kv_seg_ref[kv], i * s.block_q, j * s.block_k, s)
    m_new = jnp.maximum(m, logits.max(axis=1))
    p = jnp.exp(logits - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    acc = acc * alpha[:, None] + _matmul(p.astype(v_ref.dtype), v_ref[kv, :])
    return m_new, l * alpha + p.sum(axis=1), acc

  init = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.zeros((block_q, dim), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, _kv_blocks_for(i, s, num_kv_blocks), body, init)
  # Rows that may attend to no key output zeros; an infinite logsumexp zeroes their gradients.
  empty = m <= MASK_VALUE
  o_ref[...] = jnp.where(empty[:, None], 0.0, acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(l))


class _QueryMajorSpecs(NamedTuple):
  """BlockSpecs of the grid (batch, heads, query blocks) that the forward and dq kernels share:
  one query block (and its rows of lse/delta) per program, all keys and values."""
  q: pl.BlockSpec
  kv: pl.BlockSpec
  q_seg: pl.BlockSpec
  kv_seg: pl.BlockSpec
  rows: pl.BlockSpec

  @classmethod
  def make(cls, kv_len: int, dim: int, s: _Static):
    return cls(q=pl.BlockSpec((pl.squeezed, s.block_q, pl.squeezed, dim), lambda b, h, i: (b, i, h, 0)),
               kv=pl.BlockSpec((pl.squeezed, kv_len, pl.squeezed, dim), lambda b, h, i: (b, 0, h, 0)),
               q_seg=pl.BlockSpec((pl.squeezed, s.block_q), lambda b, h, i: (b, i)),
               kv_seg=pl.BlockSpec((pl.squeezed, kv_len), lambda b, h, i: (b, 0)),
               rows=pl.BlockSpec((pl.squeezed, pl.squeezed, s.block_q), lambda b, h, i: (b, h, i)))


def _forward(q, k, v, q_seg, kv_seg, s: _Static):
  batch, q_len, heads, dim = q.shape
  spec = _QueryMajorSpecs.make(k.shape[1], dim, s)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, s=s), grid=(batch, heads, q_len // s.block_q),
      in_specs=[spec.q, spec.kv, spec.kv, spec.q_seg, spec.kv_seg],
      out_specs=[spec.q, spec.rows],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
      interpret=s.interpret, compiler_params=_compiler_params(s.interpret, dim),
      cost_estimate=_cost(q, k, passes=2),
      name="mmjax_flash_fwd")(q, k, v, q_seg, kv_seg)


def _cost(q, k, passes: int):
  batch, q_len, heads, dim = q.shape
  flops = 2 * passes * batch * heads * q_len * k.shape[1] * dim
  return pl.CostEstimate(flops=flops, transcendentals=batch * heads * q_len * k.shape[1],
                         bytes_accessed=(q.size + 2 * k.size) * q.dtype.itemsize)


# Backward -------------------------------------------------------------------------------

def _dq_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref, dq_ref, *, s: _Static):
  i = pl.program_id(2)
  q, q_seg, do = q_ref[...], q_seg_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  num_kv_blocks = k_ref.shape[0] // s.block_k

  def body(j, dq):
    kv = pl.ds(j * s.block_k, s.block_k)
    k = k_ref[kv, :]
    p = jnp.exp(_logits(q, k, q_seg, kv_seg_ref[kv], i * s.block_q, j * s.block_k, s) - lse[:, None])
    ds = p * (_matmul_nt(do, v_ref[kv, :]) - delta[:, None])
    return dq + _matmul(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(0, _kv_blocks_for(i, s, num_kv_blocks), body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * s.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                s: _Static):
  j = pl.program_id(2)
  k, v, kv_seg = k_ref[...], v_ref[...], kv_seg_ref[...]
  num_q_blocks = q_ref.shape[0] // s.block_q

  def body(i, carry):
    dk, dv = carry
    rows = pl.ds(i * s.block_q, s.block_q)
    q, do = q_ref[rows, :], do_ref[rows, :]
    p = jnp.exp(_logits(q, k, q_seg_ref[rows], kv_seg, i * s.block_q, j * s.block_k, s)
                - lse_ref[rows][:, None])
    dv = dv + _matmul_tn(p.astype(do.dtype), do)
    ds = p * (_matmul_nt(do, v) - delta_ref[rows][:, None])
    return dk + _matmul_tn(ds.astype(q.dtype), q), dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(_first_q_block_for(j, s), num_q_blocks, body, (zeros, zeros))
  dk_ref[...] = (dk * s.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, q_seg, kv_seg, out, lse, do, s: _Static):
  batch, q_len, heads, dim = q.shape
  kv_len = k.shape[1]
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
  params = _compiler_params(s.interpret, dim)
  args = (q, k, v, q_seg, kv_seg, do, lse, delta)

  spec = _QueryMajorSpecs.make(kv_len, dim, s)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, s=s), grid=(batch, heads, q_len // s.block_q),
      in_specs=[spec.q, spec.kv, spec.kv, spec.q_seg, spec.kv_seg, spec.q, spec.rows, spec.rows],
      out_specs=spec.q, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=s.interpret, compiler_params=params, cost_estimate=_cost(q, k, passes=3),
      name="mmjax_flash_dq")(*args)

  q_full = pl.BlockSpec((pl.squeezed, q_len, pl.squeezed, dim), lambda b, h, j: (b, 0, h, 0))
  kv_block = pl.BlockSpec((pl.squeezed, s.block_k, pl.squeezed, dim), lambda b, h, j: (b, j, h, 0))
  rows_full = pl.BlockSpec((pl.squeezed, pl.squeezed, q_len), lambda b, h, j: (b, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, s=s), grid=(batch, heads, kv_len // s.block_k),
      in_specs=[q_full, kv_block, kv_block, pl.BlockSpec((pl.squeezed, q_len), lambda b, h, j: (b, 0)),
                pl.BlockSpec((pl.squeezed, s.block_k), lambda b, h, j: (b, j)), q_full, rows_full, rows_full],
      out_specs=[kv_block, kv_block],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=s.interpret, compiler_params=params, cost_estimate=_cost(q, k, passes=4),
      name="mmjax_flash_dkv")(*args)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, s: _Static):
  return _forward(q, k, v, q_seg, kv_seg, s)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, s: _Static):
  out, lse = _forward(q, k, v, q_seg, kv_seg, s)
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(s: _Static, residuals, do):
  dq, dk, dv = _backward(*residuals, do, s)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
