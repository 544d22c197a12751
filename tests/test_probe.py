"""Linear probes against float64 numpy/scipy references of the same objectives."""
import numpy as np
import pytest
import scipy.optimize

from mmjax.adapt import probe
from mmjax.errors import ConfigError


def _clusters(rng, n, d, c, sep):
  """Unit-norm features around c random centres; `sep` scales the centres against unit noise."""
  centres = rng.normal(size=(c, d)) * sep
  y = np.arange(n) % c
  x = centres[y] + rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True), y


def _ridge_reference(x, y, c, l2):
  """argmin (1/2n)·‖XW + b − Y‖² + (l2/2)·‖W‖² as one least-squares problem with l2 rows appended."""
  n, d = x.shape
  a = np.block([[x, np.ones((n, 1))], [np.sqrt(l2 * n) * np.eye(d), np.zeros((d, 1))]])
  t = np.concatenate([np.eye(c)[y], np.zeros((d, c))])
  wb = np.linalg.lstsq(a, t, rcond=None)[0]
  return wb[:d], wb[d]


def _logistic_objective(theta, x, y, c, l2):
  """Mean softmax cross-entropy + (l2/2)·‖W‖² and its analytic gradient, over theta = [vec W, b]."""
  n, d = x.shape
  w, b = theta[:d * c].reshape(d, c), theta[d * c:]
  z = x @ w + b
  z = z - z.max(axis=1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
  f = np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(n), y]) + 0.5 * l2 * np.sum(w * w)
  r = (p - np.eye(c)[y]) / n
  return f, np.concatenate([(x.T @ r + l2 * w).ravel(), r.sum(axis=0)])


@pytest.mark.parametrize("n,d", [(200, 32), (24, 64)])
def test_ridge_matches_a_float64_least_squares_reference(n, d):
  x, y = _clusters(np.random.default_rng(n), n, d, 5, sep=0.5)
  w, b = probe.ridge(x, y, 5, l2=1e-2)
  w_ref, b_ref = _ridge_reference(x, y, 5, 1e-2)
  assert w.shape == (d, 5) and b.shape == (5,)
  scale = np.abs(w_ref).max()
  np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-4, atol=1e-4 * scale)
  np.testing.assert_allclose(np.asarray(b), b_ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("l2", [1e-2, 1e-4])
def test_logistic_reaches_the_scipy_optimum_of_the_same_objective(l2):
  n, d, c = 240, 32, 4
  x, y = _clusters(np.random.default_rng(1), n, d, c, sep=0.7)
  w, b = probe.logistic(x, y, c, l2=l2)
  got = np.concatenate([np.asarray(w, np.float64).ravel(), np.asarray(b, np.float64)])
  ref = scipy.optimize.minimize(_logistic_objective, np.zeros(d * c + c), args=(x, y, c, l2), jac=True,
                                method="L-BFGS-B", options=dict(maxiter=10_000, gtol=1e-10, ftol=1e-15))
  assert ref.success
  f, grad = _logistic_objective(got, x, y, c, l2)
  assert f - ref.fun < 1e-6 * max(1.0, ref.fun)
  assert np.linalg.norm(grad) < 1e-4
  # Strong convexity (modulus l2) bounds the distance to the optimum by ‖grad‖ / l2.
  np.testing.assert_allclose(got, ref.x, atol=max(1e-3, 1e-4 / l2) * np.abs(ref.x).max())


def test_logistic_bias_is_not_penalised():
  # One class dominates; only the bias can express the prior, and a heavy l2 must not shrink it.
  rng = np.random.default_rng(2)
  x = rng.normal(size=(100, 8))
  y = (np.arange(100) % 10 == 0).astype(np.int64)  # 90% class 0.
  w, b = probe.logistic(x, y, 2, l2=100.0)
  assert np.abs(np.asarray(w)).max() < 1e-2
  np.testing.assert_allclose(float(b[0] - b[1]), np.log(9.0), rtol=1e-2)


@pytest.mark.parametrize("kind", ["ridge", "logistic"])
def test_probe_separates_gaussian_clusters_on_held_out_points(kind):
  x, y = _clusters(np.random.default_rng(3), 600, 64, 6, sep=0.6)
  train, test = np.arange(600) < 300, np.arange(600) >= 300
  w, b = probe.fit(kind, x[train], y[train], 6)
  acc = probe.accuracy(probe.predict(w, b, x[test]), y[test])
  assert float(acc) > 0.95
  # Shuffled labels carry no signal: held-out accuracy must fall to near chance (1/6).
  shuffled = np.random.default_rng(4).permutation(y[train])
  w, b = probe.fit(kind, x[train], shuffled, 6)
  assert float(probe.accuracy(probe.predict(w, b, x[test]), y[test])) < 0.35


def test_predict_and_accuracy_by_hand():
  w = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  b = np.array([0.0, 0.5], np.float32)
  x = np.array([[1.0, 0.0], [0.6, 0.3], [0.0, 1.0]], np.float32)
  np.testing.assert_allclose(np.asarray(probe.predict(w, b, x)), x @ w + b, rtol=1e-6)
  assert float(probe.accuracy(probe.predict(w, b, x), np.array([0, 0, 1]))) == pytest.approx(2 / 3)


def test_bad_arguments_raise_config_errors_naming_them():
  x, y = _clusters(np.random.default_rng(6), 20, 4, 2, sep=1.0)
  with pytest.raises(ConfigError, match="kind='svm'"):
    probe.fit("svm", x, y, 2)
  with pytest.raises(ConfigError, match="num_classes=2"):
    probe.fit("ridge", x, y + 1, 2)
  with pytest.raises(ConfigError, match="l2=0"):
    probe.fit("logistic", x, y, 2, l2=0.0)
  with pytest.raises(ConfigError, match="labels"):
    probe.ridge(x, y[:5], 2)
