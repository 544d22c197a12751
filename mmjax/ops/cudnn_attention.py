"""The door's `impl="cudnn"` on NVIDIA GPUs: JAX's cuDNN fused attention, given the door's meaning.

`cudnn_attention` returns `(output, None)`, or `(None, what it cannot take)` so that the door
falls back to its `xla` path with a warning. What it does with the door's arguments:

- dtype: cuDNN's kernel takes float16 and bfloat16 only. float32 inputs are computed in
  bfloat16 and the output is cast back: the recipes are float32 (small shapes, CPU tests),
  cuDNN has no float32 kernel, and refusing them would send every recipe to `xla`.
- key-padding masks (`[batch, 1, 1, kv_len]` after padding to 4 dims, no bias) become
  per-example key lengths. cuDNN reads a length as "the first n keys", so each example's
  keys are rotated to put its valid run first, and the output rotated back. This assumes the
  valid keys of an example are one contiguous run: left padding (the decoder's batches and
  `generate`'s prompts) or right padding. A mask with holes is computed wrongly.
- other masks, additive biases and causal attention with `q_len != kv_len` go in as a
  `[batch or 1, heads or 1, q_len, kv_len]` additive bias (cuDNN's causal mask is aligned
  top-left, the door's to the end of the keys, so that case is folded into the mask).
  cuDNN's backward needs even lengths with a bias; odd ones fall back.
- a query row with no key to attend to outputs zeros, as in the `xla` path (cuDNN gives
  an average of the values there).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.errors import ConfigError

# cuDNN's kernel dtypes; float32 inputs are computed in bfloat16 (see the module docstring).
KERNEL_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_attention(q, k, v, *, bias=None, mask=None, causal=False):
  """`(output, None)` computed by cuDNN, or `(None, description of what cuDNN cannot take)`."""
  input_dtype = jnp.result_type(q, k, v)
  if input_dtype == jnp.float32:
    kernel_dtype = jnp.bfloat16
  elif input_dtype in KERNEL_DTYPES:
    kernel_dtype = input_dtype
  else:
    return None, f"{input_dtype} inputs"
  q_len, kv_len = q.shape[1], k.shape[1]
  mask = None if mask is None else _as_4d(mask, "mask").astype(bool)
  bias = None if bias is None else _as_4d(bias, "bias")
  key_padding = (mask is not None and bias is None and mask.shape[1] == mask.shape[2] == 1
                 and (not causal or q_len == kv_len))
  as_bias = not key_padding and (mask is not None or bias is not None or (causal and q_len != kv_len))
  if as_bias and (q_len % 2 or kv_len % 2):
    # cuDNN's backward with a bias needs even lengths. Checked here, not left to JAX: JAX checks
    # it when it traces the backward, which under remat happens after this function returned.
    return None, f"a mask or bias with an odd query or key length ({q_len}, {kv_len})"
  q, k, v = (x.astype(kernel_dtype) for x in (q, k, v))
  try:
    if key_padding:
      out = _key_padded(q, k, v, jnp.broadcast_to(mask[:, 0, 0], (q.shape[0], kv_len)), causal)
    else:
      out = _dense(q, k, v, bias, mask, causal)
  except NotImplementedError as unsupported:  # JAX's limits that depend on the GPU, e.g. head dim.
    return None, f"this attention ({unsupported})"
  return out.astype(input_dtype), None


def _as_4d(x, name: str):
  """`x` with leading 1s up to `[batch, heads, q_len, kv_len]`."""
  x = jnp.asarray(x)
  if x.ndim > 4:
    raise ConfigError(f"attention {name} has shape {x.shape}; expected at most 4 dims [batch, heads, q, kv]")
  return x.reshape((1,) * (4 - x.ndim) + x.shape)


def key_lengths_and_starts(key_mask):
  """`(lengths, starts)` [batch] int32: the number of valid keys and the index of the first.

  An example with no valid key has length 0 and start 0."""
  lengths = key_mask.sum(axis=-1, dtype=jnp.int32)
  return lengths, jnp.argmax(key_mask, axis=-1).astype(jnp.int32)


def rotate(x, shift):
  """`x [batch, seq, ...]` with row b rotated left by `shift[b]`: out[b, i] = x[b, (i + shift[b]) % seq]."""
  index = (jnp.arange(x.shape[1])[None, :] + shift[:, None]) % x.shape[1]
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _key_padded(q, k, v, key_mask, causal):
  lengths, starts = key_lengths_and_starts(key_mask)
  k, v = rotate(k, starts), rotate(v, starts)
  if causal:  # q_len == kv_len: queries move with their keys, so causality is unchanged.
    q = rotate(q, starts)
  # An example with no valid key attends to key 0 and is zeroed below: no empty softmax in the kernel.
  out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.maximum(lengths, 1),
                                     is_causal=causal, implementation="cudnn")
  has_key = (lengths > 0)[:, None]
  if causal:
    out = rotate(out, -starts)
    # Query i sees keys up to i: none is valid before the run starts.
    has_key = has_key & (jnp.arange(q.shape[1])[None, :] >= starts[:, None])
  return jnp.where(has_key[:, :, None, None], out, 0)


def _dense(q, k, v, bias, mask, causal):
  q_len, kv_len = q.shape[1], k.shape[1]
  if causal and (mask is not None or q_len != kv_len):
    # Queries are aligned to the end of the keys, as in the door's xla path.
    allowed = jnp.tril(jnp.ones((1, 1, q_len, kv_len), bool), k=kv_len - q_len)
    mask = allowed if mask is None else mask & allowed
  full = lambda x: None if x is None else jnp.broadcast_to(x, x.shape[:2] + (q_len, kv_len))
  bias = None if bias is None else bias.astype(q.dtype)
  # With q_len == kv_len cuDNN's causal mask is the door's, and lets the kernel skip masked blocks.
  out = jax.nn.dot_product_attention(q, k, v, bias=full(bias), mask=full(mask),
                                     is_causal=causal and q_len == kv_len, implementation="cudnn")
  if mask is None:
    return out
  has_key = jnp.any(full(mask), axis=-1)  # [batch or 1, heads or 1, q_len]
  return jnp.where(jnp.transpose(has_key, (0, 2, 1))[..., None], out, 0)
