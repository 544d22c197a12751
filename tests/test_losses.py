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


def _candidates(n, i, k):
  """Anchor i's pair and its k negatives: (i+1 … i+k) mod n, written out one by one."""
  return [i] + [(i + j) % n for j in range(1, k + 1)]


def _two_directions(x, y, anchor_loss):
  """Σ of anchor_loss over image anchors (rows of x·yᵀ) and text anchors (its columns), / 2n,
  with the gradient w.r.t. the similarity matrix; anchor_loss(i, sims) -> (loss, d loss/d sims)."""
  n = x.shape[0]
  sims = x @ y.T
  loss, g = 0.0, np.zeros((n, n))
  for i in range(n):
    value, grad = anchor_loss(i, sims[i])
    loss, g[i] = loss + value, g[i] + grad
    value, grad = anchor_loss(i, sims[:, i])
    loss, g[:, i] = loss + value, g[:, i] + grad
  return loss / (2 * n), g / (2 * n), sims


def ref_infonce(x, y, t, k):
  """Value and analytic gradients (x, y, t) of InfoNCE with k cyclic negatives, in float64."""
  n = x.shape[0]
  dt = [0.0]

  def anchor(i, s):
    cols = _candidates(n, i, k)
    logits = t * s[cols]
    p = np.exp(logits - np.logaddexp.reduce(logits))
    onehot = np.eye(len(cols))[0]
    grad = np.zeros(n)
    grad[cols] = t * (p - onehot)
    dt[0] += np.sum((p - onehot) * s[cols])
    return np.logaddexp.reduce(logits) - logits[0], grad

  loss, g, _ = _two_directions(x, y, anchor)
  return loss, (g @ y, g.T @ x, dt[0] / (2 * n))


def ref_triplet(x, y, margin, k, hardest):
  """Value and analytic gradients (x, y) of the bidirectional hinge triplet loss, in float64."""
  n = x.shape[0]

  def anchor(i, s):
    pair, *negatives = _candidates(n, i, k)
    hinges = [(margin - s[pair] + s[j], j) for j in negatives]
    grad = np.zeros(n)
    active = [max(hinges)] if hardest else hinges
    loss = 0.0
    for h, j in active:
      if h > 0:
        loss += h
        grad[pair] -= 1.0
        grad[j] += 1.0
    return loss, grad

  loss, g, _ = _two_directions(x, y, anchor)
  return loss, (g @ y, g.T @ x)


REFERENCES = {
    "sigmoid": lambda x, y, t, b, pos: ref_sigmoid(x, y, t, b, pos),
    "softmax": lambda x, y, t, pos: ref_softmax(x, y, t, pos),
    "infonce": lambda x, y, t, pos: ref_infonce(x, y, t, 5),
    "triplet": lambda x, y, pos: ref_triplet(x, y, 0.3, 5, hardest=False),
    "triplet_hardest": lambda x, y, pos: ref_triplet(x, y, 0.3, 5, hardest=True),
}


@pytest.mark.parametrize("name, nargs", [("sigmoid", 4), ("softmax", 3), ("infonce", 3), ("triplet", 2),
                                         ("triplet_hardest", 2)])
def test_reference_gradients_match_finite_differences(inputs, name, nargs):
  x, y, positives = inputs
  ref = REFERENCES[name]
  args = (x, y, T, BIAS)[:nargs]
  value, grads = ref(*args, positives)
  assert value > 0
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


@pytest.mark.parametrize("num_negatives", [None, 1, 5])
@pytest.mark.parametrize("mesh_name", MESHES)
def test_infonce_matches_reference(inputs, mesh_name, num_negatives):
  x, y, _ = inputs
  mesh = _mesh(mesh_name)
  xs, ys = _place(mesh, x.astype(np.float32), y.astype(np.float32))
  loss = lambda x, y, t: losses.infonce_loss(x, y, t, num_negatives=num_negatives, mesh=mesh)
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(xs, ys, jnp.float32(T))
  k = BATCH - 1 if num_negatives is None else num_negatives
  _assert_matches(value, grads, *ref_infonce(x, y, T, k), mesh)


@pytest.mark.parametrize("hardest", [False, True], ids=["sum", "hardest"])
@pytest.mark.parametrize("num_negatives", [None, 3])
@pytest.mark.parametrize("mesh_name", MESHES)
def test_triplet_matches_reference(inputs, mesh_name, num_negatives, hardest):
  x, y, _ = inputs
  mesh = _mesh(mesh_name)
  xs, ys = _place(mesh, x.astype(np.float32), y.astype(np.float32))
  loss = lambda x, y: losses.triplet_loss(x, y, margin=0.3, num_negatives=num_negatives, hardest=hardest,
                                          mesh=mesh)
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(xs, ys)
  k = BATCH - 1 if num_negatives is None else num_negatives
  _assert_matches(value, grads, *ref_triplet(x, y, 0.3, k, hardest), mesh)


@pytest.mark.parametrize("num_negatives", [0, BATCH])
def test_negatives_out_of_range_are_config_errors(inputs, num_negatives):
  x, y = (jnp.asarray(a) for a in inputs[:2])
  with pytest.raises(ConfigError, match=rf"num_negatives={num_negatives} .*\[1, {BATCH - 1}\]"):
    losses.infonce_loss(x, y, T, num_negatives=num_negatives)
  with pytest.raises(ConfigError, match=rf"num_negatives={num_negatives}"):
    losses.triplet_loss(x, y, num_negatives=num_negatives)

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
