"""The Pallas flash-attention kernel (interpret mode on CPU) against float64 NumPy.

Outputs and the gradients of q, k and v are checked for odd lengths, causal and
cross-attention, key padding, segment ids, padded head dims and bfloat16; then the
kernel behind the door under an 8-device mesh and inside whole models.
"""
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from mmjax import models, parallel
from mmjax.errors import ConfigError
from mmjax.ops import attention
from mmjax.ops.attention import dot_product_attention
from mmjax.ops.flash_attention import flash_attention
from tests.test_attention import masked_softmax, reference, runs_pallas_kernel

TOLERANCES = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def allowed_pairs(batch, q_len, kv_len, causal, kv_allowed=None, q_seg=None, kv_seg=None):
  """[batch, 1, q, kv] boolean: which pairs may attend."""
  allowed = np.ones((batch, 1, q_len, kv_len), bool)
  if causal:
    allowed &= np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None] + (kv_len - q_len)
  if kv_allowed is not None:
    allowed &= kv_allowed[:, None, None, :]
  if q_seg is not None:
    allowed &= (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]
  return allowed


def reference_vjp(q, k, v, allowed, dout):
  """Output and (dq, dk, dv) of softmax attention for cotangent `dout`, in float64."""
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  scale = q.shape[-1] ** -0.5
  p = masked_softmax(np.einsum("bqhd,bkhd->bhqk", q, k) * scale, allowed)
  out = np.einsum("bhqk,bkhd->bqhd", p, v)
  dp = np.einsum("bqhd,bkhd->bhqk", dout, v)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  return out, (np.einsum("bhqk,bkhd->bqhd", ds, k) * scale, np.einsum("bhqk,bqhd->bkhd", ds, q) * scale,
               np.einsum("bhqk,bqhd->bkhd", p, dout))


def inputs(rng, batch, q_len, kv_len, heads, dim, dtype):
  shapes = [(batch, q_len, heads, dim), (batch, kv_len, heads, dim), (batch, kv_len, heads, dim),
            (batch, q_len, heads, dim)]
  return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


def check(fn, q, k, v, dout, allowed, dtype):
  out, vjp = jax.vjp(fn, q, k, v)
  grads = vjp(dout)
  want_out, want_grads = reference_vjp(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                       allowed, dout.astype(jnp.float32))
  tol = TOLERANCES[dtype]
  np.testing.assert_allclose(np.asarray(out, np.float64), want_out, **tol)
  for name, got, want in zip("qkv", grads, want_grads):
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **tol, err_msg=f"d{name}")


@pytest.mark.parametrize("batch,q_len,kv_len,heads,dim,causal,masking,dtype", [
    (2, 37, 37, 2, 64, False, None, jnp.float32),       # Odd length: padded to the block.
    (2, 37, 37, 2, 64, True, None, jnp.float32),
    (2, 20, 45, 2, 32, False, "lengths", jnp.float32),  # Cross-attention; head dim 32 padded to 64.
    (1, 45, 20, 1, 64, True, None, jnp.float32),        # More queries than keys: early rows see nothing.
    (2, 33, 33, 2, 64, True, "mask", jnp.bfloat16),
    (2, 40, 40, 1, 128, False, "segments", jnp.float32),
    (1, 17, 17, 1, 256, True, "mask", jnp.bfloat16),
])
def test_matches_float64_reference(batch, q_len, kv_len, heads, dim, causal, masking, dtype):
  rng = np.random.default_rng(q_len * kv_len + dim)
  q, k, v, dout = inputs(rng, batch, q_len, kv_len, heads, dim, dtype)
  kw, kv_allowed, q_seg, kv_seg = {}, None, None, None
  if masking == "lengths":
    lengths = np.array([kv_len, 7])
    kw["kv_lengths"] = jnp.asarray(lengths)
    kv_allowed = np.arange(kv_len)[None] < lengths[:, None]
  elif masking == "mask":
    kv_allowed = rng.random((batch, kv_len)) < 0.7
    kv_allowed[:, 0] = True
    kw["kv_mask"] = jnp.asarray(kv_allowed)
  elif masking == "segments":  # Two packed sequences per row, split at different points.
    q_seg = kv_seg = (np.arange(q_len)[None] >= np.array([[15], [28]])).astype(np.int32)
    kw.update(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg))
  fn = lambda q, k, v: flash_attention(q, k, v, causal=causal, block_q=16, block_k=16, **kw)
  check(fn, q, k, v, dout, allowed_pairs(batch, q_len, kv_len, causal, kv_allowed, q_seg, kv_seg), dtype)


def test_default_blocks_and_single_query():
  """MAP-head shape: one probe query over many keys, default block sizes."""
  rng = np.random.default_rng(3)
  q, k, v, dout = inputs(rng, 2, 1, 50, 2, 64, jnp.float32)
  check(flash_attention, q, k, v, dout, allowed_pairs(2, 1, 50, False), jnp.float32)


def test_bad_block_size_is_named():
  x = jnp.zeros((1, 8, 1, 64))
  with pytest.raises(ConfigError, match="block_q=24"):
    flash_attention(x, x, x, block_q=24)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_door_under_8_device_mesh_shards_the_kernel(axis_type):
  mesh = jax.make_mesh((4, 1, 2), ("data", "fsdp", "tensor"), axis_types=(axis_type,) * 3)
  rules = parallel.axis_rules((("act_batch", ("data", "fsdp")), ("heads", "tensor")), mesh)
  rng = np.random.default_rng(4)
  q, k, v, dout = inputs(rng, 8, 24, 24, 2, 64, jnp.float32)
  kv_allowed = rng.random((8, 24)) < 0.7
  kv_allowed[:, 0] = True
  mask = jnp.asarray(kv_allowed[:, None, None, :])

  def fn(q, k, v):
    return dot_product_attention(q, k, v, mask=mask, causal=True, impl="pallas")

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jitted = jax.jit(lambda q, k, v, dout: jax.vjp(fn, q, k, v)[1](dout))
    assert "manual_computation" in jitted.lower(q, k, v, dout).as_text()  # shard_map, not auto-partitioned
    check(jax.jit(fn), q, k, v, dout, allowed_pairs(8, 24, 24, True, kv_allowed), jnp.float32)


def test_unsupported_masks_fall_back_to_xla_with_one_warning():
  attention._warned.clear()
  rng = np.random.default_rng(5)
  q, k, v, _ = inputs(rng, 1, 6, 6, 1, 8, jnp.float32)
  full = jnp.asarray(rng.random((1, 1, 6, 6)) < 0.8) | jnp.eye(6, dtype=bool)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    outs = [dot_product_attention(q, k, v, mask=full, impl="pallas") for _ in range(2)]
  assert len(caught) == 1 and "using impl='xla'" in str(caught[0].message)
  np.testing.assert_allclose(np.asarray(outs[0]), reference(q, k, v, np.asarray(full)), rtol=1e-5, atol=1e-6)


def test_models_with_pallas_match_xla():
  """A ViT (MAP pooling: 1-query cross-attention) and a causal text transformer, whole model."""
  def config(impl):
    return dict(image=dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, pool="map"),
                text=dict(width=32, depth=2, mlp_dim=64, num_heads=2, vocab_size=50, max_len=12,
                          pool="eos", causal=True),
                embed_dim=16, bias_init=-10.0, attention_impl=impl)

  rng = np.random.default_rng(6)
  image = jnp.asarray(rng.normal(size=(2, 40, 40, 3)), jnp.float32)  # 25 patches
  text = jnp.asarray(rng.integers(3, 50, size=(2, 12)), jnp.int32).at[:, 9].set(2)
  xla, pallas = models.build(config("xla")), models.build(config("pallas"))
  params = xla.init(jax.random.PRNGKey(0), image=image, text=text)["params"]

  def loss(model, params):
    zimg, ztxt, _ = model.apply({"params": params}, image=image, text=text)
    return jnp.sum(zimg @ ztxt.T), (zimg, ztxt)

  (want, want_z), want_g = jax.value_and_grad(lambda p: loss(xla, p), has_aux=True)(params)
  (got, got_z), got_g = jax.value_and_grad(lambda p: loss(pallas, p), has_aux=True)(params)
  assert runs_pallas_kernel(lambda p: loss(pallas, p), params)
  for a, b in zip(got_z, want_z):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=str(path))


def test_door_falls_back_when_the_batch_does_not_split_over_the_mesh():
  attention._warned.clear()
  mesh = parallel.make_mesh((("data", 4), ("fsdp", 1), ("tensor", 2)))
  rules = parallel.axis_rules((("act_batch", ("data", "fsdp")), ("heads", "tensor")), mesh)
  rng = np.random.default_rng(7)
  q, k, v, _ = inputs(rng, 6, 10, 10, 2, 8, jnp.float32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, impl="pallas"))(q, k, v)
  assert any("do not split evenly" in str(w.message) for w in caught)
  np.testing.assert_allclose(np.asarray(out), reference(q, k, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim", [64, 320])
def test_lowers_to_triton_for_gpu(dim):
  """Forward and backward lower for CUDA through Pallas's Triton backend, from this CPU host."""
  spec = jax.ShapeDtypeStruct((1, 45, 2, dim), jnp.bfloat16)
  grads = jax.grad(lambda q, k, v: flash_attention(q, k, v, causal=True, interpret=False).astype(jnp.float32).sum(),
                   argnums=(0, 1, 2))
  with parallel.compile_for("cuda", "NVIDIA H100"):  # Triton's lowering asks for the GPU (jax >= 0.11).
    text = jax.jit(grads).trace(spec, spec, spec).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("custom_call @__gpu$xla.gpu.triton") == 3  # forward, dq, dk/dv


@pytest.mark.parametrize("causal,pooled", [(True, False), (False, True), (True, True)])
def test_packed_and_pooled_blocks_go_through_the_kernel(causal, pooled):
  """Packed rows (segment ids) and a non-causal tower's pooled last block run the kernel; a causal
  tower's pooled last block says once why it does not. All match the xla path."""
  from mmjax.models.vit import Encoder
  attention._warned.clear()
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 24, 16)), jnp.float32)
  segments = jnp.asarray(np.sort(rng.integers(0, 3, (2, 24)), axis=1))
  keep = jnp.asarray([[5, 23], [10, 17]]) if pooled else None
  make = lambda impl: Encoder(depth=2, mlp_dim=32, num_heads=2, causal=causal, attention_impl=impl)
  params = make("xla").init(jax.random.PRNGKey(0), x, True, keep, segments)
  run = lambda impl: lambda p: jnp.sum(make(impl).apply(p, x, True, keep, segments)[0] ** 2)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got, got_grads = jax.value_and_grad(run("pallas"))(params)
  want, want_grads = jax.value_and_grad(run("xla"))(params)
  assert runs_pallas_kernel(run("pallas"), params)
  says_why = any("pooled at one token" in str(w.message) for w in caught)
  assert says_why == (causal and pooled)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
