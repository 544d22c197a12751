"""A `dot_general` for `nn.Dense` that multiplies the tokens as one 2-D matrix.

For `x @ kernel` with x [batch, length, in], autodiff's kernel gradient contracts the output
gradient with `x` over both leading axes. XLA:CPU lays that out as an explicit transpose of the
output gradient and a matmul with both operands transposed, which its Eigen path runs slower than
the same product in other forms (`benchmarks/RESULTS.md`). Flattened to [tokens, in] first, the
same values come from a kernel gradient XLA computes without the transpose.

Flattening keeps a batch-axis sharding. A sharded length axis (`act_seq` mapped to a mesh axis,
which no recipe does) cannot survive the merge: XLA would gather x on every device first.
"""
from __future__ import annotations

import math

from jax import lax


def dense_dot_general(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` for `nn.Dense`'s contraction (x [..., in] with kernel [in, out])."""
  if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())) or kernel.ndim != 2:
    raise ValueError(f"dense_dot_general contracts x's last axis with a 2-D kernel's first; "
                     f"got dimension_numbers={dimension_numbers}, kernel shape {kernel.shape}")
  tokens = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
  y = lax.dot_general(tokens, kernel, (((1,), (0,)), ((), ())), precision=precision,
                      preferred_element_type=preferred_element_type)
  return y.reshape(*x.shape[:-1], kernel.shape[1])
