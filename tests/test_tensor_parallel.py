"""Tensor parallelism trained: a two-tower model and a decoder LM on `tensor=2` and on
data x fsdp x tensor = 2x2x2 match one device, and their steps compile without XLA replicating
the token embeddings ("Involuntary full rematerialization")."""
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import parallel, tasks
from mmjax.models.text import TokenEmbed
from mmjax.rules import path_str
from mmjax.runs import make_train_step, sharded_state
from tests.helpers import tiny_config, tiny_generative_recipe

STEPS = 3
MESHES = {"one_device": (("data", 1), ("fsdp", 1), ("tensor", 1)),
          "tensor2": (("data", 1), ("fsdp", 1), ("tensor", 2)),
          "data2xfsdp2xtensor2": (("data", 2), ("fsdp", 2), ("tensor", 2))}
REMATERIALIZATION = "Involuntary full rematerialization"
# Widths, MLP widths, head counts and the 160-token vocabularies divide by 2, so these are split
# over `tensor` (the test checks it, so that it cannot pass without tensor parallelism).
TENSOR_SPLIT = {"two_tower": ("^txt/Embed_0/embedding$", "^txt/.*/query/kernel$", "^img/.*/Dense_0/kernel$"),
                "lm": ("^embedder/embedding$", "/query/kernel$", "/gate/kernel$", "^lm_head/kernel$")}


def _config(model, mesh_config):
  if model == "two_tower":
    return tiny_config(mesh=mesh_config)
  config = tiny_generative_recipe("lm_shapes", **{"model.width": 32, "model.mlp_dim": 64, "model.num_heads": 2,
                                                  "model.depth": 1, "data.max_len": 16})
  config.mesh = mesh_config
  return config


def _batches(config, task):
  rng = np.random.default_rng(0)
  b, vocab = config.data.batch_size, task.tokenizer.vocab_size
  if config.task == "contrastive":
    size, length = config.data.image_size, config.model.text.max_len
    return [{"image": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32),
             "text": rng.integers(3, vocab, (b, length)).astype(np.int32)} for _ in range(STEPS)]
  length = config.data.max_len
  mask = np.arange(length)[None, :] >= np.arange(b)[:, None] % 4  # Left padding of 0-3 tokens.
  batches = []
  for _ in range(STEPS):
    tokens = np.where(mask, rng.integers(3, vocab, (b, length)), 0).astype(np.int32)
    batches.append({"tokens": tokens, "mask": mask, "targets": np.roll(tokens, -1, axis=1),
                    "weights": np.concatenate([mask[:, 1:], np.zeros((b, 1), bool)], axis=1).astype(np.float32)})
  return batches


def _train(model, mesh_name, initial_state=None):
  """`(per-step (loss, gradient norm), final state, initial state on the host)` of STEPS steps on
  MESHES[mesh_name], from `initial_state` (None: the model's initialisation)."""
  config = _config(model, MESHES[mesh_name])
  mesh = parallel.make_mesh(config.mesh, devices=jax.devices()[:math.prod(size for _, size in config.mesh)])
  rules = parallel.axis_rules(config.axis_rules, mesh)
  task = tasks.get(config.task)(config, mesh)
  history = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, shardings, tx, lr, init = sharded_state(task, config, mesh, rules)
    if initial_state is None:  # Placed from the host on the other meshes: one initialiser compile, not three.
      initial_state = jax.device_get(init(jax.random.key(config.seed)))
    state = jax.device_put(initial_state, shardings)
    step = make_train_step(task, tx, lr, shardings, mesh)
    for batch in _batches(config, task):
      state, metrics = step(state, parallel.global_batch(batch, mesh), jax.random.key(1))
      history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  return np.array(history), state, initial_state


@pytest.mark.parametrize("model", ["two_tower", "lm"])
def test_tensor_parallel_training_matches_one_device(model, capfd):
  history_1, state_1, initial_state = _train(model, "one_device")
  assert history_1[0, 0] != history_1[-1, 0]  # The model trains, so the comparison means something.
  for mesh_name in ("tensor2", "data2xfsdp2xtensor2"):
    history_n, state_n, _ = _train(model, mesh_name, initial_state)
    split = [path_str(path) for path, x in jax.tree_util.tree_leaves_with_path(state_n["params"])
             if "tensor" in jax.tree.leaves(tuple(x.sharding.spec))]
    for pattern in TENSOR_SPLIT[model]:
      assert any(re.search(pattern, path) for path in split), (pattern, split)
    # float32: the sharded step sums the same products in another order (partial sums over the
    # tensor shards, gradients over data and fsdp), so results differ by float rounding, which Adam's
    # normalised updates carry into the parameters; a sharding that changed the math (a head, a
    # vocabulary shard or a partial sum lost) moves the loss by far more than 1e-5.
    np.testing.assert_allclose(history_n, history_1, rtol=1e-5, err_msg=mesh_name)

    # Attention key biases have an exactly zero gradient (softmax ignores a per-query constant),
    # so Adam turns float noise into lr-sized steps whose sign depends on the reduction order.
    def close(path, a, b):
      if not path_str(path).endswith("key/bias"):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6,
                                   err_msg=f"{mesh_name} {path_str(path)}")

    jax.tree_util.tree_map_with_path(close, state_n["params"], state_1["params"])
  assert REMATERIALIZATION not in capfd.readouterr().err


@pytest.mark.parametrize("embed_class", [nn.Embed, TokenEmbed])
def test_token_embedding_lookup_compiles_without_replicating(embed_class, capfd):
  # nn.Embed gathers from the table as it is split (vocab over tensor, embed over fsdp), and XLA logs
  # that it replicates the embeddings to split them over the batch: this shows the log reaches capfd,
  # which the training test relies on.
  mesh = parallel.make_mesh(MESHES["data2xfsdp2xtensor2"])
  rules = parallel.axis_rules(tiny_config().axis_rules, mesh)
  embed = embed_class(16, 8, embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                         ("vocab", "embed")))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 16, (8, 4)), jnp.int32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(embed.init, jax.random.key(0), ids)
    shardings = parallel.logical_shardings(mesh, rules, boxed)
    params = jax.jit(lambda: nn.unbox(embed.init(jax.random.key(0), ids)), out_shardings=shardings)()

    def loss(params, ids):
      x = nn.with_logical_constraint(embed.apply(params, ids), ("act_batch", None, None))
      return jnp.sum(x * x)

    grads = jax.jit(jax.grad(loss), in_shardings=(shardings, parallel.batch_sharding(mesh)))(params, ids)
  table = np.asarray(params["params"]["embedding"])
  np.testing.assert_allclose(np.asarray(grads["params"]["embedding"]),
                             np.stack([2 * table[i] * (np.asarray(ids) == i).sum() for i in range(16)]), rtol=1e-6)
  assert (REMATERIALIZATION in capfd.readouterr().err) == (embed_class is nn.Embed)
