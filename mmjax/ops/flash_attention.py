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

Where it runs follows the compile target (`parallel.target_platform()`), not the host:
- GPU: these kernels, through Pallas's Triton backend (named explicitly: JAX's default
  GPU backend for `pallas_call` is Mosaic GPU).
- TPU: JAX's splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), fed
  the same segment ids and causal alignment. It streams K/V blocks through VMEM, skips
  fully masked blocks, and is what MaxText trains with (docs/kernels.md says why it is
  not these kernels).
- CPU: these kernels in Pallas interpret mode; `interpret=True` under
  `parallel.compile_for("tpu")` runs the splash kernels in interpret mode instead.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from mmjax import parallel
from mmjax.errors import ConfigError

# Finite stand-in for -inf: exp(MASK - max) underflows to 0, and fully masked rows stay finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_MIN_HEAD_DIM = 64  # Smaller head dims are zero-padded up to it; larger ones to a power of two.
# (block_q, block_k) per platform: GPU tiles sized for shared memory; in interpret mode
# larger blocks mean fewer interpreted grid steps.
DEFAULT_BLOCKS = {"gpu": (128, 64), "cpu": (128, 128)}
_MIN_BLOCK = 16  # Triton's smallest tile for tl.dot.
# Splash blocks: sequences are padded to a multiple of the TPU's 128 lanes, and a block is the
# largest of these that divides the padded length (MaxText's splash blocks are 512).
_TPU_BLOCKS = (512, 256, 128)


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
  platform = parallel.target_platform()
  interpret = platform == "cpu" if interpret is None else interpret

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
  if platform == "tpu":
    return _splash_attention(q, k, v, q_seg, kv_seg, causal=causal, block_q=block_q, block_k=block_k,
                             interpret=interpret)

  default_q, default_k = DEFAULT_BLOCKS["cpu" if interpret else "gpu"]
  block_q = _fit_block(block_q or default_q, q_len, "block_q")
  block_k = _fit_block(block_k or default_k, kv_len, "block_k")
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
  if interpret:
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


# TPU: splash attention ------------------------------------------------------------------

def _splash_attention(q, k, v, q_seg, kv_seg, *, causal: bool, block_q: int | None, block_k: int | None,
                      interpret: bool):
  """The door's attention through JAX's TPU splash kernels: [B, S, H, D] in and out, rows
  with no allowed key zeroed (splash leaves them the mean of their masked values)."""
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  q_pad, kv_pad = -q_len % _TPU_BLOCKS[-1], -kv_len % _TPU_BLOCKS[-1]
  block_q = _tpu_block(block_q, q_len + q_pad, "block_q")
  block_k = _tpu_block(block_k, kv_len + kv_pad, "block_k")
  kernel = _splash_kernel(heads, q_len + q_pad, kv_len + kv_pad, kv_len - q_len if causal else None,
                          block_q, block_k, interpret)
  to_heads_major = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  segments = splash.SegmentIds(q=jnp.pad(q_seg, ((0, 0), (0, q_pad))),
                               kv=jnp.pad(kv_seg, ((0, 0), (0, kv_pad)), constant_values=-1))
  scaled_q = (q.astype(jnp.float32) * head_dim ** -0.5).astype(q.dtype)  # Splash does not scale.
  out = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=seg))(
      to_heads_major(scaled_q, q_pad), to_heads_major(k, kv_pad), to_heads_major(v, kv_pad), segments)
  out = out.transpose(0, 2, 1, 3)[:, :q_len]
  return jnp.where(_rows_with_keys(q_seg, kv_seg, causal)[:, :, None, None], out, 0).astype(q.dtype)


def _tpu_block(block: int | None, padded_len: int, name: str) -> int:
  if block is None:
    return next(b for b in _TPU_BLOCKS if padded_len % b == 0)
  if block % _TPU_BLOCKS[-1] or padded_len % block:
    raise ConfigError(f"flash_attention on TPU: {name}={block} must be a multiple of {_TPU_BLOCKS[-1]} that "
                      f"divides the padded sequence length {padded_len}")
  return block


def _splash_kernel(heads: int, q_len: int, kv_len: int, causal_offset: int | None, block_q: int, block_k: int,
                   interpret: bool):
  """Splash's kernel for these shapes. Not cached: it holds arrays made under the caller's trace."""
  shape = (q_len, kv_len)
  mask = splash_mask.FullMask(shape) if causal_offset is None else splash_mask.CausalMask(shape, offset=causal_offset)
  blocks = splash.BlockSizes(block_q=block_q, block_kv=block_k, block_kv_compute=block_k,
                             block_q_dkv=block_q, block_kv_dkv=block_k, block_kv_dkv_compute=block_k,
                             block_q_dq=block_q, block_kv_dq=block_k)
  return splash.make_splash_mha(splash_mask.MultiHeadMask([mask] * heads), block_sizes=blocks, head_shards=1,
                                q_seq_shards=1, interpret=interpret)


def _rows_with_keys(q_seg, kv_seg, causal: bool):
  """[B, Sq] bool: whether each query row may attend to at least one key (a fused compare-and-
  reduce in XLA; nothing of size Sq x Sk is stored)."""
  allowed = q_seg[:, :, None] == kv_seg[:, None, :]
  if causal:
    q_len, kv_len = q_seg.shape[1], kv_seg.shape[1]
    allowed &= jnp.arange(kv_len)[None, None, :] <= jnp.arange(q_len)[None, :, None] + (kv_len - q_len)
  return allowed.any(axis=-1)
