"""Contrastive losses against float64 NumPy references, on 1, 2 and 8 fake CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import losses, parallel
from mmjax.errors import ConfigError

BATCH, DIM = 16, 8
T, BIAS = 3.0, -2.0
MESHES = ("none", "data1", "data2", "data8", "data2_fsdp4")


def _mesh(name):
  if name == "none":
    return None
  if name == "data2_fsdp4":
    return parallel.make_mesh((("data", 2), ("fsdp", 4)), devices=jax.devices()[:8])
  n = int(name[len("data"):])
  return parallel.make_mesh((("data", n),), devices=jax.devices()[:n])


def _unit_rows(rng, n, d):
  v = rng.normal(size=(n, d))
  return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  x, y = _unit_rows(rng, BATCH, DIM), _unit_rows(rng, BATCH, DIM)
  positives = rng.random((BATCH, BATCH)) < 0.15
  return x, y, positives


def _log_sigmoid(u):
  return -np.logaddexp(0.0, -u)


def _sigmoid(u):
  return np.exp(_log_sigmoid(u))


def ref_sigmoid(x, y, t, b, positives=None):
  """Value and analytic gradients (x, y, t, b) of the SigLIP loss in float64."""
  n = x.shape[0]
  pos = np.eye(n, dtype=bool) if positives is None else np.eye(n, dtype=bool) | positives
  z = np.where(pos, 1.0, -1.0)
  sims = x @ y.T
  logits = t * sims + b
  loss = -np.sum(_log_sigmoid(z * logits)) / n
  g = -z * _sigmoid(-z * logits) / n
  return loss, (t * g @ y, t * g.T @ x, np.sum(g * sims), np.sum(g))


def ref_softmax(x, y, t, positives=None):
  """Value and analytic gradients (x, y, t) of the symmetric CLIP loss in float64."""
  n = x.shape[0]
  pos = np.eye(n, dtype=bool) if positives is None else np.eye(n, dtype=bool) | positives
  sims = x @ y.T
  logits = t * sims
  row_target = pos / pos.sum(1, keepdims=True)
  col_target = pos / pos.sum(0, keepdims=True)
  row_logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
  col_logp = logits - np.logaddexp.reduce(logits, axis=0, keepdims=True)
  loss = -(np.sum(row_target * row_logp) + np.sum(col_target * col_logp)) / (2 * n)
  g = ((np.exp(row_logp) - row_target) + (np.exp(col_logp) - col_target)) / (2 * n)
  return loss, (t * g @ y, t * g.T @ x, np.sum(g * sims))


@pytest.mark.parametrize("ref, nargs", [(ref_sigmoid, 4), (ref_softmax, 3)])
def test_reference_gradients_match_finite_differences(inputs, ref, nargs):
  x, y, positives = inputs
  args = (x, y, T, BIAS)[:nargs]
  _, grads = ref(*args, positives)
  rng = np.random.default_rng(1)
  eps = 1e-6
  for i, arg in enumerate(args):
    direction = rng.normal(size=np.shape(arg))
    plus = list(args)
    minus = list(args)
    plus[i] = arg + eps * direction
    minus[i] = arg - eps * direction
    numeric = (ref(*plus, positives)[0] - ref(*minus, positives)[0]) / (2 * eps)
    np.testing.assert_allclose(np.sum(grads[i] * direction), numeric, rtol=1e-6)


def _place(mesh, *arrays):
  if mesh is None:
    return [jnp.asarray(a) for a in arrays]
  sharding = NamedSharding(mesh, P(parallel.batch_axes(mesh)))
  return [jax.device_put(jnp.asarray(a), sharding) for a in arrays]


def _assert_matches(value, grads, ref_value, ref_grads, mesh):
  assert value.shape == () and value.dtype == jnp.float32
  if mesh is not None:
    assert value.sharding.is_fully_replicated
  np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-6)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(got).reshape(np.shape(want)), want, rtol=1e-5, atol=1e-6)


SIGMOID_CASES = [("none", "ring")] + [
    (m, impl) for m in MESHES[1:] for impl in losses.SIGMOID_IMPLS]


@pytest.mark.parametrize("with_positives", [False, True], ids=["diagonal", "positives"])
@pytest.mark.parametrize("mesh_name, impl", SIGMOID_CASES)
def test_sigmoid_matches_reference(inputs, mesh_name, impl, with_positives):
  x, y, positives = inputs
  positives = positives if with_positives else None
  mesh = _mesh(mesh_name)
  xs, ys = _place(mesh, x.astype(np.float32), y.astype(np.float32))
  pos = None if positives is None else jnp.asarray(positives)
  t, b = jnp.array([T], jnp.float32), jnp.float32(BIAS)

  def loss(x, y, t, b, pos):
    return losses.sigmoid_loss(x, y, t, b, mesh=mesh, impl=impl, positives=pos)

  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(xs, ys, t, b, pos)
  assert grads[2].shape == (1,) and grads[3].shape == ()
  _assert_matches(value, grads, *ref_sigmoid(x, y, T, BIAS, positives), mesh)


@pytest.mark.parametrize("with_positives", [False, True], ids=["diagonal", "positives"])
@pytest.mark.parametrize("mesh_name", MESHES)
def test_softmax_matches_reference(inputs, mesh_name, with_positives):
  x, y, positives = inputs
  positives = positives if with_positives else None
  mesh = _mesh(mesh_name)
  xs, ys = _place(mesh, x.astype(np.float32), y.astype(np.float32))
  pos = None if positives is None else jnp.asarray(positives)

  def loss(x, y, t, pos):
    return losses.softmax_loss(x, y, t, mesh=mesh, positives=pos)

  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(xs, ys, jnp.float32(T), pos)
  _assert_matches(value, grads, *ref_softmax(x, y, T, positives), mesh)


def test_ring_bfloat16_inputs_compute_in_float32(inputs):
  x, y, _ = inputs
  x16, y16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
  mesh = _mesh("data8")
  xs, ys = _place(mesh, x16, y16)
  loss = lambda x, y: losses.sigmoid_loss(x, y, T, BIAS, mesh=mesh, impl="ring")
  value, (gx, gy) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(xs, ys)
  assert value.dtype == jnp.float32 and gx.dtype == gy.dtype == jnp.bfloat16
  want = ref_sigmoid(np.asarray(x16, np.float64), np.asarray(y16, np.float64), T, BIAS)[0]
  np.testing.assert_allclose(value, want, rtol=1e-5)


def _compiled_sigmoid_grad(impl, num_devices, block, dim):
  mesh = _mesh(f"data{num_devices}")
  emb = jax.ShapeDtypeStruct((block * num_devices, dim), jnp.float32,
                             sharding=NamedSharding(mesh, P("data")))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  loss = lambda x, y, t, b: losses.sigmoid_loss(x, y, t, b, mesh=mesh, impl=impl)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(
      emb, emb, scalar, scalar).compile()


def test_ring_memory_is_blockwise_and_flat_in_devices():
  block, dim = 128, 16
  ring8 = _compiled_sigmoid_grad("ring", 8, block, dim)
  hlo = ring8.as_text()
  assert "all-gather" not in hlo
  assert f"f32[{block},{8 * block}]" not in hlo and f"f32[{8 * block},{dim}]" not in hlo
  temp = lambda compiled: compiled.memory_analysis().temp_size_in_bytes
  assert 4 * temp(ring8) <= temp(_compiled_sigmoid_grad("all_gather", 8, block, dim))
  assert temp(ring8) == temp(_compiled_sigmoid_grad("ring", 2, block, dim))


def test_unknown_impl_is_a_config_error(inputs):
  x, y, _ = inputs
  with pytest.raises(ConfigError, match=r"impl='flash'.*ring.*all_gather.*dense"):
    losses.sigmoid_loss(jnp.asarray(x), jnp.asarray(y), T, BIAS, impl="flash")


@pytest.mark.parametrize("impl", ["ring", "all_gather", "softmax"])
def test_batch_not_divisible_by_devices_is_a_config_error(impl):
  x = jnp.ones((12, DIM), jnp.float32)
  mesh = _mesh("data8")
  with pytest.raises(ConfigError, match=r"batch size 12 .*D=8"):
    if impl == "softmax":
      losses.softmax_loss(x, x, T, mesh=mesh)
    else:
      losses.sigmoid_loss(x, x, T, BIAS, mesh=mesh, impl=impl)


def test_bad_shapes_are_config_errors(inputs):
  x, y, _ = inputs
  x, y = jnp.asarray(x), jnp.asarray(y)
  with pytest.raises(ConfigError, match="positives"):
    losses.sigmoid_loss(x, y, T, BIAS, positives=jnp.ones((BATCH, BATCH - 1), bool))
  with pytest.raises(ConfigError, match="positives"):
    losses.softmax_loss(x, y, T, positives=jnp.ones((BATCH,), bool))
  with pytest.raises(ConfigError, match="zimg"):
    losses.sigmoid_loss(x, y[:-1], T, BIAS)
