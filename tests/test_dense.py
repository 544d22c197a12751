import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mmjax.models import decoder, layers
from mmjax.ops.dense import dense_dot_general


@pytest.mark.parametrize("x_shape,width", [((7,), 7), ((4, 7), 7), ((3, 5, 7), 7), ((2, 3, 2, 7), 7),
                                           ((0, 5, 7), 7), ((3, 5, 0), 0)])
def test_matches_float64_matmul_and_its_gradients(x_shape, width):
  rng = np.random.default_rng(0)
  x, kernel = rng.normal(size=x_shape), rng.normal(size=(width, 6))
  cotangent = rng.normal(size=x_shape[:-1] + (6,))

  def loss(x, kernel):
    y = dense_dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return jnp.sum(y * cotangent.astype(np.float32)), y

  (_, y), (dx, dkernel) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      x.astype(np.float32), kernel.astype(np.float32))
  np.testing.assert_allclose(y, x @ kernel, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, cotangent @ kernel.T, rtol=1e-5, atol=1e-5)
  tokens = x.reshape(int(np.prod(x_shape[:-1])), width)
  np.testing.assert_allclose(dkernel, tokens.T @ cotangent.reshape(-1, 6), rtol=1e-5, atol=1e-5)


def test_passes_precision_and_output_type_through():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4)), jnp.bfloat16)
  kernel = jnp.ones((4, 5), jnp.bfloat16)
  dims = (((2,), (0,)), ((), ()))
  y = dense_dot_general(x, kernel, dims, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  assert y.dtype == jnp.float32 and y.shape == (2, 3, 5)
  np.testing.assert_allclose(y, np.asarray(x, np.float64) @ np.ones((4, 5)), rtol=1e-6)
  jaxpr = str(jax.make_jaxpr(lambda x, k: dense_dot_general(x, k, dims, precision=lax.Precision.HIGHEST))(x, kernel))
  assert "HIGHEST" in jaxpr
  dense = nn.Dense(5, dtype=jnp.bfloat16, dot_general=dense_dot_general)
  params = dense.init(jax.random.key(0), x)
  assert dense.apply(params, x).dtype == jnp.bfloat16


@pytest.mark.parametrize("dims,kernel_shape", [((((1,), (0,)), ((), ())), (3, 5)), ((((2,), (0,)), ((), ())), (4, 5, 6))])
def test_refuses_a_contraction_that_is_not_dense(dims, kernel_shape):
  with pytest.raises(ValueError, match="dimension_numbers"):
    dense_dot_general(jnp.ones((2, 3, 4)), jnp.ones(kernel_shape), dims)


def _transposed_dots(hlo: str) -> int:
  """Dots that contract the first axis of the left operand with the last of the right: both
  operands transposed, the form XLA:CPU runs slowest."""
  return len(re.findall(r" dot\([^)]*\), lhs_contracting_dims=\{0\}, rhs_contracting_dims=\{1\}", hlo))


@pytest.mark.parametrize("block", [layers.MlpBlock(mlp_dim=256, act="gelu"), decoder.FeedForward(mlp_dim=256)])
def test_mlp_kernel_gradients_need_no_transposed_operands_on_cpu(monkeypatch, block):
  """The ViT's and the decoder's MLP kernel gradients compile without the doubly transposed
  matmul that `lax.dot_general`'s gradient becomes on XLA:CPU (tokens [batch, length, width])."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 50, 64)), jnp.float32)
  params = block.init(jax.random.key(0), x)

  def compiled_gradient():
    loss = lambda params: jnp.sum(block.apply(params, x) ** 2)
    return jax.jit(jax.grad(loss)).lower(params).compile().as_text()

  ours = compiled_gradient()
  monkeypatch.setattr(layers, "dense_dot_general", lax.dot_general)
  if not _transposed_dots(compiled_gradient()):
    pytest.skip("this XLA lays out lax.dot_general's kernel gradient without the transposes")
  assert _transposed_dots(ours) == 0
