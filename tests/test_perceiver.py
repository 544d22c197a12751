"""Perceiver IO against a float64 NumPy forward pass; its cost linear in the input length; the classifier task."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import train as train_lib
from mmjax.config import load
from mmjax.models.perceiver import PerceiverIO, fourier_position_features
from mmjax.models.vit import Encoder1DBlock
from tests.helpers import logged_losses, np_attention, np_cross_block, np_layer_norm, np_mlp, random_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HEADS, CROSS_HEADS, MLP, LATENTS = 16, 4, 2, 24, 6


def _self(p, z):
  h = np_layer_norm(p["LayerNorm_0"], z)
  y = z + np_attention(p["MultiHeadDotProductAttention_0"], h, h)
  return y + np_mlp(p["MlpBlock_0"], np_layer_norm(p["LayerNorm_1"], y))


def reference(p, inputs, iterations, depth, share, queries=None):
  """Perceiver IO written out: input projection, iterated cross + self attention, query decoder."""
  x = inputs @ p["input_proj"]["kernel"] + p["input_proj"]["bias"]
  z = np.broadcast_to(p["latents"], (len(inputs), *p["latents"].shape))
  for i in range(iterations):
    tag = "0" if i == 0 else "shared" if share else str(i)
    z = np_cross_block(p[f"cross_{tag}"], z, x)
    for j in range(depth):
      z = _self(p[f"self_{tag}_{j}"], z)
  if queries is None:
    queries = np.broadcast_to(p["output_queries"], (len(inputs), *p["output_queries"].shape))
  y = np_layer_norm(p["final_norm"], np_cross_block(p["decoder"], queries, z))
  return y @ p["output_proj"]["kernel"] + p["output_proj"]["bias"]


def _model(iterations=3, depth=2, share=True, outputs=3):
  return PerceiverIO(num_latents=LATENTS, width=WIDTH, num_iterations=iterations, self_attention_depth=depth,
                     num_heads=HEADS, cross_heads=CROSS_HEADS, mlp_dim=MLP, num_outputs=outputs, output_width=5,
                     share_weights=share)


@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_perceiver_io_matches_the_numpy_forward(share):
  model = _model(share=share)
  inputs = np.random.default_rng(0).normal(size=(2, 11, 7))
  params = random_params(model, jnp.asarray(inputs, jnp.float32))
  got = model.apply({"params": params}, jnp.asarray(inputs, jnp.float32))
  want = reference(jax.tree.map(lambda a: np.asarray(a, np.float64), params), inputs, 3, 2, share)
  assert got.shape == (2, 3, 5)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # Iterations 2 and 3 share one set of weights, or have their own.
  blocks = {k.split("_")[1] for k in params if k.startswith("cross_")}
  assert blocks == ({"0", "shared"} if share else {"0", "1", "2"})


def test_perceiver_io_decodes_given_output_queries():
  model = _model(iterations=1, depth=1)
  rng = np.random.default_rng(1)
  inputs, queries = rng.normal(size=(2, 9, 7)), rng.normal(size=(2, 4, WIDTH))
  params = random_params(model, jnp.asarray(inputs, jnp.float32), seed=1)
  got = model.apply({"params": params}, jnp.asarray(inputs, jnp.float32), jnp.asarray(queries, jnp.float32))
  want = reference(jax.tree.map(lambda a: np.asarray(a, np.float64), params), inputs, 1, 1, True, queries)
  assert got.shape == (2, 4, 5)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fourier_position_features_follow_the_formula():
  feats = fourier_position_features(3, 4, num_bands=2, max_resolution=4)
  assert feats.shape == (12, 2 + 4 * 2)
  freqs = (1.0, 2.0)  # linspace(1, max_resolution / 2, 2)
  for index, row in enumerate(feats):
    i, j = divmod(index, 4)
    pos = (-1 + 2 * i / 2, -1 + 2 * j / 3)
    sines = [np.sin(np.pi * f * p) for p in pos for f in freqs]
    cosines = [np.cos(np.pi * f * p) for p in pos for f in freqs]
    np.testing.assert_allclose(row, [*pos, *sines, *cosines], atol=1e-6)


def _flops(module, length):
  inputs = jax.ShapeDtypeStruct((1, length, WIDTH), jnp.float32)
  params = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), inputs)
  compiled = jax.jit(module.apply).lower(params, inputs).compile()
  analysis = compiled.cost_analysis()
  return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


def test_perceiver_cost_is_linear_in_input_length_where_self_attention_is_not():
  lengths = (256, 512, 1024)
  perceiver = [_flops(_model(iterations=2, depth=1), n) for n in lengths]
  # Each doubling of M adds twice the FLOPs the previous doubling added: cost = a + b*M exactly.
  np.testing.assert_allclose(perceiver[2] - perceiver[1], 2 * (perceiver[1] - perceiver[0]), rtol=0.01)
  block = Encoder1DBlock(mlp_dim=MLP, num_heads=HEADS)
  attention = [_flops(block, n) for n in lengths]
  assert attention[2] - attention[1] > 2.5 * (attention[1] - attention[0])


def test_perceiver_recipe_trains_and_evaluates(tmp_path):
  config = load(os.path.join(REPO, "configs", "perceiver_shapes.py"))
  config.total_steps, config.optim.warmup_steps, config.data.batch_size = 40, 2, 16
  config.log_every, config.checkpoint_every, config.eval_every = 4, 40, 40
  config.optim.lr = 4e-3
  config.evals.per_class, config.evals.batch_size = 2, 48
  summary = train_lib.train(config, str(tmp_path))
  logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [m["step"] for m in logged if "loss" in m] == list(range(4, 41, 4))
  losses = logged_losses(str(tmp_path))
  assert losses[-1] <= 0.8 * losses[0], losses  # Measured 4.5 at step 4, 3.0 at step 40.
  assert {"acc", "colour_acc", "shape_acc"} <= set(summary)
  # 96 test images. Chance is 2 of them for the 48 classes (measured 14), 12 for the 8 colours (measured 83);
  # shapes are not learned yet.
  assert summary["acc"] >= 3 / 48, "want 3 x chance"
  assert summary["colour_acc"] >= 3 / 8, "want 3 x chance"
