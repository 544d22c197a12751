"""The attention door against a float64 NumPy softmax-attention reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError
from mmjax.ops.attention import dot_product_attention


def reference(q, k, v, mask=None, causal=False):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  allowed = np.ones(logits.shape, bool)
  if causal:
    qn, kn = q.shape[1], k.shape[1]
    allowed &= np.arange(kn)[None, :] <= np.arange(qn)[:, None] + (kn - qn)
  if mask is not None:
    allowed &= np.broadcast_to(mask, logits.shape)
  return np.einsum("bhqk,bkhd->bqhd", masked_softmax(logits, allowed), v)


def runs_pallas_kernel(fn, *args) -> bool:
  """Whether `fn` really reaches the kernel: the door's xla fallback gives right answers too."""
  return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def masked_softmax(logits, allowed):
  """Softmax over the allowed entries of the last axis; a row with none allowed is all zeros."""
  shifted = np.where(allowed, logits - np.where(allowed, logits, -np.inf).max(-1, keepdims=True), -np.inf)
  p = np.where(allowed, np.exp(np.where(allowed, shifted, 0.0)), 0.0)
  total = p.sum(-1, keepdims=True)
  return p / np.where(total > 0, total, 1.0)


@pytest.mark.parametrize("impl", ["xla", "cudnn", "pallas"])
@pytest.mark.parametrize("q_len,kv_len,causal,use_mask", [
    (7, 7, False, False), (7, 7, True, False), (5, 9, False, True), (9, 9, True, True)])
def test_matches_reference(impl, q_len, kv_len, causal, use_mask):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, q_len, 3, 8)).astype(np.float32)
  k = rng.normal(size=(2, kv_len, 3, 8)).astype(np.float32)
  v = rng.normal(size=(2, kv_len, 3, 8)).astype(np.float32)
  mask = None
  if use_mask:  # Key padding: example 1 attends to its first 4 keys only.
    lengths = np.array([kv_len, 4])
    mask = (np.arange(kv_len)[None, :] < lengths[:, None])[:, None, None, :]
  attend = lambda q, k, v: dot_product_attention(q, k, v, mask=None if mask is None else jnp.asarray(mask),
                                                 causal=causal, impl=impl)
  out = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  if impl == "pallas":
    assert runs_pallas_kernel(attend, q, k, v)
  np.testing.assert_allclose(np.asarray(out), reference(q, k, v, mask, causal), rtol=1e-5, atol=1e-5)


def test_bias_is_added_to_logits():
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(1, 4, 2, 8)).astype(np.float32) for _ in range(3))
  bias = np.zeros((1, 2, 4, 4), np.float32)
  bias[..., 1:] = -1e9  # Everything attends to key 0 only.
  out = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), bias=jnp.asarray(bias))
  np.testing.assert_allclose(np.asarray(out), np.broadcast_to(v[:, :1], out.shape), rtol=1e-6)


def test_row_with_no_key_outputs_zeros():
  x = jnp.ones((1, 3, 1, 4))
  mask = jnp.zeros((1, 1, 1, 3), bool)
  np.testing.assert_array_equal(np.asarray(dot_product_attention(x, x, x, mask=mask)), 0.0)


def test_unknown_impl_names_it():
  x = jnp.zeros((1, 2, 1, 4))
  with pytest.raises(ConfigError, match="impl='flash'"):
    dot_product_attention(x, x, x, impl="flash")
