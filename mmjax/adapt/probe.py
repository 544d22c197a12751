"""Linear probes on frozen features, as in CLIP's linear-probe evaluation: ridge, logistic.

A probe is a pair (W [D, C], b [C]) with logits = features @ W + b. Fitting runs in float32 JAX with
full-precision matmuls (so accelerators do not drop to bf16/TF32). k-shot splits are
`mmjax.data.classes.kshot_indices`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from mmjax.errors import ConfigError

_dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def _check(features, labels, num_classes: int, l2: float, what: str) -> tuple[jax.Array, jax.Array]:
  """float32 features [N, D] and int32 labels [N], after checking shapes, label range and l2."""
  x, y = jnp.asarray(features, jnp.float32), jnp.asarray(labels)
  if x.ndim != 2 or y.shape != x.shape[:1] or not len(y):
    raise ConfigError(f"{what}: features must be [N, D] and labels [N] with N > 0; got {x.shape} and {y.shape}")
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise ConfigError(f"{what}: labels must be integer class ids; got dtype {y.dtype}")
  if num_classes < 1 or int(y.min()) < 0 or int(y.max()) >= num_classes:
    raise ConfigError(f"{what}: labels must lie in [0, num_classes={num_classes}); "
                      f"got range [{int(y.min())}, {int(y.max())}]")
  if not l2 > 0:
    raise ConfigError(f"{what}: l2={l2} must be positive")
  return x, y.astype(jnp.int32)


def ridge(features, labels, num_classes: int, l2: float = 1e-3) -> tuple[jax.Array, jax.Array]:
  """Closed-form ridge regression on one-hot targets: (W [D, C], b [C]).

  Minimises (1/2n)·‖XW + b − Y‖² + (l2/2)·‖W‖². Features and targets are centred so the bias is not
  penalised. With n ≥ d it solves the primal d×d system (XᵀX + l2·n·I) W = XᵀY; with n < d the dual
  n×n system (XXᵀ + l2·n·I) A = Y with W = XᵀA, which has the same solution. Both by jnp.linalg.solve.
  """
  x, y = _check(features, labels, num_classes, l2, "ridge")
  return _ridge(x, y, num_classes, jnp.float32(l2))


@functools.partial(jax.jit, static_argnames="num_classes")
def _ridge(x, y, num_classes, l2):
  n, d = x.shape
  x_mean = x.mean(axis=0)
  t = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
  t_mean = t.mean(axis=0)
  xc, tc = x - x_mean, t - t_mean
  if n >= d:
    w = jnp.linalg.solve(_dot(xc.T, xc) + l2 * n * jnp.eye(d), _dot(xc.T, tc))
  else:
    w = _dot(xc.T, jnp.linalg.solve(_dot(xc, xc.T) + l2 * n * jnp.eye(n), tc))
  return w, t_mean - _dot(x_mean, w)


def logistic(features, labels, num_classes: int, *, l2: float = 1e-4, steps: int = 300,
             tol: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  """Multinomial logistic regression: (W [D, C], b [C]).

  Minimises mean softmax cross-entropy + (l2/2)·‖W‖² (bias unpenalised), full batch, with optax L-BFGS
  (zoom line search) from zeros; stops after `steps` iterations or once the gradient norm is below
  `tol`. The objective is strictly convex, so the result is deterministic and seed-free.
  """
  x, y = _check(features, labels, num_classes, l2, "logistic")
  if steps < 1:
    raise ConfigError(f"logistic: steps={steps} must be at least 1")
  return _logistic(x, y, num_classes, jnp.float32(l2), steps, jnp.float32(tol))


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _logistic(x, y, num_classes, l2, steps, tol):
  def objective(params):
    w, b = params
    ce = optax.softmax_cross_entropy_with_integer_labels(_dot(x, w) + b, y).mean()
    return ce + 0.5 * l2 * jnp.sum(w * w)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=objective)
    return optax.apply_updates(params, updates), state

  def running(carry):
    _, state = carry
    count = optax.tree_utils.tree_get(state, "count")
    grad_norm = optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "grad"))
    return (count == 0) | ((count < steps) & (grad_norm >= tol))

  init = (jnp.zeros((x.shape[1], num_classes), jnp.float32), jnp.zeros((num_classes,), jnp.float32))
  params, _ = jax.lax.while_loop(running, step, (init, opt.init(init)))
  return params


def predict(w, b, features) -> jax.Array:
  """Logits [N, C] of a probe."""
  return _dot(jnp.asarray(features, jnp.float32), w) + b


def accuracy(logits, labels) -> jax.Array:
  """Top-1 accuracy, a float32 scalar."""
  return jnp.mean(jnp.argmax(logits, axis=-1) == jnp.asarray(labels)).astype(jnp.float32)


_KINDS = {"ridge": ridge, "logistic": logistic}


def fit(kind: str, features, labels, num_classes: int, **kw) -> tuple[jax.Array, jax.Array]:
  """Fits the probe named by `kind` ("ridge" | "logistic"); `kw` goes to that fitter."""
  if kind not in _KINDS:
    raise ConfigError(f"probe kind={kind!r} must be one of {sorted(_KINDS)}")
  return _KINDS[kind](features, labels, num_classes, **kw)
