"""attention_impl="cudnn": lowered for CUDA on this host, and its masking checked numerically on CPU."""
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo

from mmjax import parallel
from mmjax.errors import ConfigError
from mmjax.models.decoder import Decoder
from mmjax.ops import attention
from mmjax.ops.attention import dot_product_attention
from mmjax.ops.cudnn_attention import cudnn_attention, key_lengths_and_starts, rotate
from tests.test_attention import reference

BATCH, HEADS, HEAD_DIM = 2, 2, 16
FORWARD, BACKWARD = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"
BIAS_FORWARD, BIAS_BACKWARD = "__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"


@pytest.fixture
def cuda_target(monkeypatch):
  # JAX asks this host's cuDNN for its version while tracing the cuDNN call, and a CPU-only
  # jaxlib has none ("cuDNN is not detected."). A real version number stands in for the
  # target GPU's cuDNN, so that the call can be lowered for a GPU that is not here.
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(attention, "_warned", set())


def qkv(q_len=8, kv_len=8, dtype=jnp.float32, head_dim=HEAD_DIM, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(BATCH, q_len, HEADS, head_dim)] + [(BATCH, kv_len, HEADS, head_dim)] * 2
  return tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes)


def key_padding(lengths, kv_len, left=True):
  """Bool [batch, 1, 1, kv_len], the decoder's key mask: the last (left=True) or first `lengths[b]` keys."""
  index = np.arange(kv_len)[None, :]
  lengths = np.asarray(lengths)[:, None]
  valid = index >= kv_len - lengths if left else index < lengths
  return jnp.asarray(valid[:, None, None, :])


def lowered_for_cuda(fn, *args) -> str:
  with parallel.compile_for("cuda"):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def cudnn_calls(text: str) -> set[str]:
  return set(re.findall(r"__cudnn\$\w+", text))


def forward_and_backward(**door_kw):
  forward = lambda q, k, v: dot_product_attention(q, k, v, impl="cudnn", **door_kw)
  loss = lambda q, k, v: forward(q, k, v).astype(jnp.float32).sum()
  return forward, jax.grad(loss, argnums=(0, 1, 2))


# (q_len, kv_len, door keyword arguments, cuDNN forward call, backward call, cuDNN mask type)
CASES = {
    "no mask": (8, 8, {}, FORWARD, BACKWARD, "NO_MASK"),
    "causal": (8, 8, {"causal": True}, FORWARD, BACKWARD, "CAUSAL"),
    "decoder key padding, causal": (8, 8, {"mask": key_padding([8, 5], 8), "causal": True},
                                    FORWARD, BACKWARD, "PADDING_CAUSAL"),
    "example with no key": (4, 8, {"mask": key_padding([3, 0], 8)}, FORWARD, BACKWARD, "PADDING"),
    # cuDNN's causal mask is aligned top-left: the door's goes in as a bias.
    "causal, q_len < kv_len": (4, 8, {"causal": True}, BIAS_FORWARD, BIAS_BACKWARD, "NO_MASK"),
    "causal, q_len > kv_len": (8, 4, {"causal": True}, BIAS_FORWARD, BIAS_BACKWARD, "NO_MASK"),
    "per-query mask": (8, 8, {"mask": jnp.asarray(np.tri(8, dtype=bool)[::-1][None, None])},
                       BIAS_FORWARD, BIAS_BACKWARD, "NO_MASK"),
    "bias": (8, 8, {"bias": jnp.zeros((1, HEADS, 8, 8))}, BIAS_FORWARD, BIAS_BACKWARD, "NO_MASK"),
}


@pytest.mark.usefixtures("cuda_target")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_lowers_to_cudnn_forward_and_backward(case, dtype):
  q_len, kv_len, door_kw, forward_call, backward_call, mask_type = CASES[case]
  forward, backward = forward_and_backward(**door_kw)
  args = qkv(q_len, kv_len, dtype)
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message=".*using impl='xla'")  # No fallback.
    warnings.filterwarnings("ignore", message=".*bfloat16")
    forward_text, backward_text = lowered_for_cuda(forward, *args), lowered_for_cuda(backward, *args)
  assert cudnn_calls(forward_text) == {forward_call}
  assert cudnn_calls(backward_text) == {forward_call, backward_call}
  assert f"mask_type\\22: \\22{mask_type}\\22" in forward_text
  kernel_lines = [line for line in backward_text.splitlines() if "__cudnn$" in line]
  assert all("xbf16>" in line for line in kernel_lines)
  with parallel.compile_for("cuda"):
    assert jax.eval_shape(forward, *args).dtype == dtype


@pytest.mark.usefixtures("cuda_target")
def test_float32_is_computed_in_bfloat16_with_one_warning():
  forward, backward = forward_and_backward(causal=True)
  args = qkv()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lowered_for_cuda(forward, *args)
    lowered_for_cuda(backward, *args)
  messages = [str(w.message) for w in caught]
  assert messages == ["attention impl='cudnn' computes float32 inputs in bfloat16 (cuDNN has no float32 kernel)"]


@pytest.mark.usefixtures("cuda_target")
@pytest.mark.parametrize("q_len,kv_len,head_dim,door_kw,reason", [
    (7, 7, HEAD_DIM, {"mask": jnp.asarray(np.tri(7, dtype=bool)[None, None])}, "odd query or key length"),
    (7, 7, HEAD_DIM, {"causal": True, "bias": jnp.zeros((1, 1, 7, 7))}, "odd query or key length"),
    (8, 8, 12, {}, "head dim"),
])
def test_what_cudnn_cannot_take_falls_back_to_xla(q_len, kv_len, head_dim, door_kw, reason):
  forward, backward = forward_and_backward(**door_kw)
  args = qkv(q_len, kv_len, jnp.bfloat16, head_dim)
  for fn in (forward, backward):
    with pytest.warns(UserWarning, match=f"impl='cudnn' does not support .*{reason}.*using impl='xla'"):
      attention._warned.clear()
      assert not cudnn_calls(lowered_for_cuda(fn, *args))


@pytest.mark.usefixtures("cuda_target")
def test_odd_lengths_with_a_mask_fall_back_under_remat():
  # Under remat JAX checks cuDNN's backward limits only after the door has returned.
  mask = jnp.asarray(np.tri(7, dtype=bool)[None, None])
  attend = jax.checkpoint(lambda q, k, v: dot_product_attention(q, k, v, mask=mask, impl="cudnn"))
  loss = lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()
  with pytest.warns(UserWarning, match="odd query or key length"):
    assert not cudnn_calls(lowered_for_cuda(jax.grad(loss), *qkv(7, 7, jnp.bfloat16)))


@pytest.mark.usefixtures("cuda_target")
def test_decoder_training_step_lowers_to_cudnn():
  decoder = Decoder(vocab_size=32, width=32, depth=1, num_heads=2, mlp_dim=64, attention_impl="cudnn",
                    dtype=jnp.bfloat16)
  tokens = jnp.zeros((2, 8), jnp.int32)
  mask = jnp.asarray(np.arange(8)[None, :] >= np.array([[0], [3]]))  # Left-padded, as the data pipeline does.
  params = jax.eval_shape(lambda: decoder.init(jax.random.key(0), tokens, mask=mask))
  loss = lambda params: decoder.apply(params, tokens, mask=mask)[0].sum()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    text = lowered_for_cuda(jax.grad(loss), params)
  assert cudnn_calls(text) == {FORWARD, BACKWARD}


def test_off_gpu_the_door_uses_its_xla_path():
  q, k, v = qkv(4, 8)
  mask = key_padding([8, 0], 8)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = dot_product_attention(q, k, v, mask=mask, impl="cudnn")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(dot_product_attention(q, k, v, mask=mask)))
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)  # jax.nn's xla path would average the values.


def test_rotate_matches_numpy_roll():
  x = np.arange(2 * 5 * 3).reshape(2, 5, 3)
  shift = np.array([2, -1])
  expected = np.stack([np.roll(x[b], -shift[b], axis=0) for b in range(2)])
  np.testing.assert_array_equal(np.asarray(rotate(jnp.asarray(x), jnp.asarray(shift))), expected)


def test_key_lengths_and_starts():
  key_mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 0, 0]], bool)
  lengths, starts = key_lengths_and_starts(key_mask)
  np.testing.assert_array_equal(np.asarray(lengths), [3, 2, 0, 2])
  np.testing.assert_array_equal(np.asarray(starts), [2, 0, 0, 1])


def test_mask_with_more_than_four_dims_names_it():
  q, k, v = qkv()
  with pytest.raises(ConfigError, match="attention mask has shape"):
    cudnn_attention(q, k, v, mask=jnp.ones((1, 1, 1, 1, 8), bool))


@pytest.fixture
def cudnn_semantics_on_cpu(monkeypatch):
  """jax.nn's xla implementation for the cuDNN kernel: it applies the same key lengths,
  top-left causal mask and bias, so what `cudnn_attention` builds around the kernel (rotated
  rows, the door's causal alignment, zeroed rows) runs here."""
  xla_attention = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *args, implementation, **kw: xla_attention(*args, implementation="xla", **kw))


# (q_len, kv_len, mask, causal); batch 3 where the mask is per example.
NUMERIC_CASES = {
    "left padding, causal (decoder)": (8, 8, key_padding([8, 5, 0], 8, left=True), True),
    "right padding, causal": (8, 8, key_padding([8, 5, 0], 8, left=False), True),
    "left padding, q_len < kv_len": (5, 8, key_padding([8, 3, 0], 8, left=True), False),
    "causal, q_len > kv_len (first rows empty)": (8, 4, None, True),
    "causal, q_len < kv_len": (4, 8, None, True),
    "per-query mask with an empty row, causal": (
        8, 8, jnp.asarray(np.tri(8, dtype=bool)[::-1] & (np.arange(8) != 3)[:, None])[None, None], True),
}


@pytest.mark.usefixtures("cudnn_semantics_on_cpu")
@pytest.mark.parametrize("case", NUMERIC_CASES)
def test_matches_float64_reference(case):
  q_len, kv_len, mask, causal = NUMERIC_CASES[case]
  rng = np.random.default_rng(1)
  batch = 3 if mask is not None and mask.shape[0] == 3 else BATCH
  q, k, v = (rng.normal(size=(batch, n, HEADS, HEAD_DIM)).astype(np.float32) for n in (q_len, kv_len, kv_len))
  attend = jax.jit(lambda q, k, v: cudnn_attention(q, k, v, mask=mask, causal=causal))
  out, unsupported = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  assert unsupported is None and out.dtype == jnp.float32
  expected = reference(q, k, v, None if mask is None else np.asarray(mask), causal)
  assert np.abs(expected).max() > 0.5
  np.testing.assert_allclose(np.asarray(out), expected, atol=3e-2)  # Computed in bfloat16.


@pytest.mark.usefixtures("cudnn_semantics_on_cpu")
def test_gradients_match_the_xla_path():
  q, k, v = qkv(8, 8)
  q, k, v = (jnp.concatenate([x, x[:1]]) for x in (q, k, v))  # Batch 3, for the three masks.
  mask = key_padding([8, 5, 0], 8)
  out_grad = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), jnp.float32)
  grads = jax.jit(lambda attend: jax.vjp(attend, q, k, v)[1](out_grad), static_argnums=0)
  cudnn_grads = grads(lambda q, k, v: cudnn_attention(q, k, v, mask=mask, causal=True)[0])
  xla_grads = grads(lambda q, k, v: dot_product_attention(q, k, v, mask=mask, causal=True))
  for cudnn_grad, xla_grad in zip(cudnn_grads, xla_grads):
    assert np.abs(np.asarray(xla_grad)).max() > 0.5
    np.testing.assert_allclose(np.asarray(cudnn_grad), np.asarray(xla_grad), atol=6e-2)


@pytest.mark.usefixtures("cudnn_semantics_on_cpu")
def test_bias_and_mask_match_the_xla_path():
  q, k, v = qkv(8, 8)
  bias = jnp.asarray(np.random.default_rng(2).normal(size=(1, HEADS, 8, 8)), jnp.float32)
  mask = key_padding([6, 0], 8)
  out, unsupported = jax.jit(lambda q, k, v: cudnn_attention(q, k, v, bias=bias, mask=mask, causal=True))(q, k, v)
  assert unsupported is None
  expected = dot_product_attention(q, k, v, bias=bias, mask=mask, causal=True)
  np.testing.assert_array_equal(np.asarray(expected[1]), 0.0)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=3e-2)
