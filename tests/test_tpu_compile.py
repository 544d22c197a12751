"""TPU without a TPU: the attention that runs on TPU (splash kernels, interpret mode on CPU)
against float64 NumPy, real TPU compiles of it at the recipes' shapes, and `mmjax.compile`.

libtpu compiles for a v5e-4 slice's device descriptions on this CPU host (`.[tpu]` extra)."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import compile as compile_lib, parallel
from mmjax.errors import ConfigError
from mmjax.ops.attention import dot_product_attention
from mmjax.ops.flash_attention import flash_attention
from tests.helpers import tiny_config
from tests.test_flash_attention import allowed_pairs, check, inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("batch,q_len,kv_len,heads,dim,causal,masking,dtype", [
    (2, 37, 37, 2, 72, True, None, jnp.float32),        # So400m's head dim; padded to 128 lanes.
    (2, 20, 45, 2, 32, False, "lengths", jnp.float32),  # Cross-attention; example 0 has no key at all.
    (1, 45, 20, 1, 64, True, None, jnp.float32),        # More queries than keys: early rows see nothing.
    (2, 1, 45, 2, 64, False, "mask", jnp.float32),      # MAP pooling's single probe.
    (2, 40, 40, 1, 128, True, "segments", jnp.bfloat16),  # Packed captions.
])
def test_tpu_kernel_matches_float64_reference(batch, q_len, kv_len, heads, dim, causal, masking, dtype):
  rng = np.random.default_rng(q_len * kv_len + dim)
  q, k, v, dout = inputs(rng, batch, q_len, kv_len, heads, dim, dtype)
  kw, kv_allowed, q_seg, kv_seg = {}, None, None, None
  if masking == "lengths":
    lengths = np.array([0, 30])
    kw["kv_lengths"], kv_allowed = lengths, np.arange(kv_len)[None] < lengths[:, None]
  elif masking == "mask":
    kv_allowed = rng.random((batch, kv_len)) < 0.7
    kw["kv_mask"] = kv_allowed
  elif masking == "segments":
    q_seg = np.sort(rng.integers(0, 3, (batch, q_len)), axis=1)
    kv_seg = q_seg.copy()
    kv_seg[:, -5:] = 9  # Keys no query may see.
    kw.update(q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  fn = lambda q, k, v: flash_attention(q, k, v, causal=causal, interpret=True, **kw)
  with parallel.compile_for("tpu"):
    assert "splash" in str(jax.make_jaxpr(fn)(q, k, v))
    check(fn, q, k, v, dout, allowed_pairs(batch, q_len, kv_len, causal, kv_allowed, q_seg, kv_seg), dtype)


@pytest.fixture(scope="session")
def v5e_mesh():
  _, devices = compile_lib.topology_devices("v5e:2x2")
  return parallel.make_mesh((("data", -1),), devices=devices)


# The recipes' attention shapes: ViT-B/16 at 256 px, So400m/14 at 378 px, the causal decoders,
# packed captions and MAP pooling's probe (over So400m's tokens).
@pytest.mark.parametrize("q_len,kv_len,dim,causal,segmented", [
    (256, 256, 64, False, False), (729, 729, 72, False, False), (2048, 2048, 64, True, False),
    (2048, 2048, 128, True, False), (77, 77, 64, True, True), (1, 729, 72, False, False)])
def test_pallas_attention_compiles_for_tpu(v5e_mesh, q_len, kv_len, dim, causal, segmented):
  batch, heads = 4, 2
  sharding = NamedSharding(v5e_mesh, P("data"))
  q = jax.ShapeDtypeStruct((batch, q_len, heads, dim), jnp.bfloat16, sharding=sharding)
  kv = jax.ShapeDtypeStruct((batch, kv_len, heads, dim), jnp.bfloat16, sharding=sharding)
  segments = jax.ShapeDtypeStruct((batch, q_len), jnp.int32, sharding=sharding) if segmented else None

  def loss(q, k, v, segments):
    out = dot_product_attention(q, k, v, causal=causal, q_segment_ids=segments, kv_segment_ids=segments,
                                impl="pallas")
    return out.astype(jnp.float32).sum()

  with jax.set_mesh(v5e_mesh), nn.logical_axis_rules((("act_batch", "data"),)):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, segments)
    compiled = lowered.compile()
  assert lowered.as_text().count("tpu_custom_call") >= 3  # Forward, dq and dk/dv kernels.
  if q_len * kv_len >= 729 ** 2:  # O(seq) memory: far below one float32 score matrix per device.
    assert compiled.memory_analysis().temp_size_in_bytes < batch // 4 * heads * q_len * kv_len * 4 / 4


def test_splash_blocks_are_checked():
  q = jnp.zeros((1, 256, 1, 64))
  with parallel.compile_for("tpu"), pytest.raises(ConfigError, match="block_q=192"):
    flash_attention(q, q, q, block_q=192, interpret=True)


def _tiny_recipe(attention_impl="xla", scan=False):
  config = tiny_config()
  config.data.tokenizer = "shapes"
  config.model.attention_impl = attention_impl
  config.model.image.update(depth=2, scan=scan)
  config.model.text.update(depth=2, scan=scan)
  return config


@pytest.mark.parametrize("attention_impl", ["xla", "pallas"])
def test_tiny_recipe_compiles_for_v5e(attention_impl):
  report = compile_lib.compile_tpu(_tiny_recipe(attention_impl), "v5e:2x2", count_flops=False)
  assert report["fits"] and report["devices"] == 4 and report["mesh"]["data"] == 4
  assert report["hbm_gib"] == 16
  assert (report["kernel_calls"] > 0) == (attention_impl == "pallas")
  # Parameters + Adam state of the tiny model, replicated over the data axis: float32, three copies.
  n_params = sum(x.size for x in jax.tree.leaves(compile_lib.lower_train_step(_tiny_recipe(), parallel.make_mesh(
      (("data", -1),)))[1]["params"]))
  assert abs(report["state_gib"] * 2 ** 30 - 3 * 4 * n_params) < 1024


def test_flops_count_every_layer_of_a_scanned_stack():
  """XLA's cost analysis sees a scanned body once; the count on the unrolled program does not."""
  scanned = _tiny_recipe(scan=True)
  counted = compile_lib.step_flops(scanned, remat=False)
  one_layer = _tiny_recipe(scan=False)
  one_layer.model.image.depth = one_layer.model.text.depth = 1
  # Two layers per tower cost more than one by about a layer's worth: the count is not per-body.
  assert counted > 1.3 * compile_lib.step_flops(one_layer, remat=False)
  mesh = parallel.make_mesh((("data", 1),), devices=jax.devices()[:1])
  scanned.mesh = (("data", 1),)
  assert compile_lib.lower_train_step(scanned, mesh)[0].cost_analysis()["flops"] < 0.9 * counted


def test_flops_with_remat_count_the_recomputation():
  config = _tiny_recipe()
  config.model.image.remat_policy = config.model.text.remat_policy = "full"
  assert compile_lib.step_flops(config, remat=True) > 1.1 * compile_lib.step_flops(config, remat=False)


def test_per_device_batch_follows_the_slice():
  config = _tiny_recipe()
  config.data.per_device_batch_size = 8
  report = compile_lib.compile_tpu(config, "v5e:2x2", count_flops=False)
  assert report["batch"] == 32


def _run_compile(*args):
  return subprocess.run([sys.executable, "-m", "mmjax.compile", "--config", "tests/tiny_config.py:4x1", *args],
                        capture_output=True, text=True, cwd=REPO, timeout=600)


def test_command_prints_the_table_and_refuses_what_does_not_fit():
  fits = _run_compile("--topology", "v5e:2x2", "--config.model.attention_impl=pallas")
  assert fits.returncode == 0, fits.stdout[-2000:] + fits.stderr[-3000:]
  for row in ("params + optimizer GiB/device", "temporaries GiB/device", "fits", "model GFLOPs/device/step",
              "MFU", "compile s"):
    assert row in fits.stdout
  assert "yes (" in fits.stdout and "roofline estimate" in fits.stdout
  too_big = _run_compile("--topology", "v5e:2x2", "--config.data.batch_size=400000", "--count_flops=false")
  assert too_big.returncode == 1
  assert "does not fit" in too_big.stdout and "fsdp" in too_big.stdout and "remat_policy" in too_big.stdout
  unknown = _run_compile("--topology", "v9x:2x2")
  assert unknown.returncode == 1 and "--topology='v9x:2x2'" in unknown.stdout


def test_cuda_lowering_reports_the_attention_kernels():
  report = compile_lib.lower_gpu(_tiny_recipe("pallas"))
  # Two blocks per tower, MAP pooling's probe and the text tower's pooled token (its last block runs
  # one query): five attentions, each a forward, a dq and a dk/dv kernel.
  assert report["custom_calls"]["triton"] == 5 * 3


def test_cuda_lowering_reports_cudnn_calls(monkeypatch):
  from jax._src.cudnn import fused_attention_stablehlo
  # Stands in for jaxlib's query of the host's cuDNN version, which a CPU-only jaxlib cannot answer.
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
  config = _tiny_recipe("cudnn")
  config.model.dtype = "bfloat16"
  config.mesh = (("data", 1),)  # On one device the cuDNN calls are in the lowered program itself.
  calls = compile_lib.lower_gpu(config, devices=jax.devices()[:1])["custom_calls"]
  # The image tower's two blocks and the text tower's first, forward and backward each. The
  # single-query attentions (MAP pooling, the text tower's pooled last block) fall back to xla.
  assert calls["cudnn"] == 3 * 2 and calls["triton"] == 0


def test_cuda_lowering_without_cudnn_says_what_to_do():
  with pytest.raises(compile_lib.CompileError, match="attention_impl='pallas' or 'xla'"):
    compile_lib.lower_gpu(_tiny_recipe("cudnn"))
