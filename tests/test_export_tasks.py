"""`python -m mmjax.export` on a run of each task, and `mmjax.load` of what it wrote: the loaded model
with the loaded parameters gives the run's own loss on the same batch."""
import flax.linen as nn
import jax
import numpy as np
import pytest

import mmjax
from mmjax import export, parallel, runs, train
from configs import fusion_shapes, perceiver_shapes, prompt_shapes
from tests.helpers import tiny_config, tiny_generative_recipe


def _short(config):
  config.total_steps, config.checkpoint_every, config.eval_every, config.log_every = 2, 2, 0, 1
  config.optim.warmup_steps = 1
  return config


@pytest.fixture(scope="module")
def two_tower_export(tmp_path_factory):
  """A two-step tiny two-tower run and its export, the base of the prompt-learning run."""
  root = tmp_path_factory.mktemp("two_tower")
  train.train(_short(tiny_config()), str(root / "run"))
  return str(root / "run"), export.export(str(root / "run"), str(root / "export"))


def _config(task_name, base_export):
  if task_name == "generative":
    return tiny_generative_recipe("lm_shapes", **{"model.width": 32, "model.depth": 1, "model.mlp_dim": 64})
  if task_name in ("classification", "fusion"):
    c = (perceiver_shapes if task_name == "classification" else fusion_shapes).get_config()
    c.data.batch_size = 16
    return c
  c = prompt_shapes.get_config("method=coop")
  c.model = tiny_config().model
  c.init_from = (("base", base_export),)
  c.data.update(image_size=32, shots=2, test_per_class=2, batch_size=16)
  c.prompt.update(depth=1)
  return c


def _batch(task, mesh):
  """A random global batch with the shapes of a training batch (integers in [0, 3): valid token ids
  and labels)."""
  rng = np.random.default_rng(0)
  local = {k: (rng.integers(0, 3, v.shape).astype(v.dtype) if np.issubdtype(v.dtype, np.integer)
               else rng.normal(size=v.shape).astype(v.dtype))
           for k, v in task.dummy_batch(parallel.batch_size_divisor(mesh)).items()}
  return parallel.global_batch(task.prepare_batch(local), mesh)


@pytest.mark.parametrize("task_name", ["contrastive", "generative", "classification", "fusion", "prompt_learning"])
def test_a_run_of_every_task_exports_and_loads(task_name, two_tower_export, tmp_path):
  if task_name == "contrastive":  # The run the prompt learner starts from.
    workdir, out = two_tower_export
  else:
    config = _short(_config(task_name, two_tower_export[1]))
    assert config.task == task_name
    workdir = str(tmp_path / "run")
    train.train(config, workdir)
    out = export.export(workdir, str(tmp_path / "export"))

  model, params, tokenizer = mmjax.load(out)
  config = runs.load_run_config(workdir)
  task, mesh, run_params, _ = runs.restore_params(config, workdir)
  assert type(model) is type(task.model)
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(run_params))
  assert (tokenizer is None) == (task.tokenizer is None)

  def loss(params):
    return jax.jit(lambda p, b: task.loss_fn(p, b, jax.random.key(0), train=False)[0])(params, batch)

  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.axis_rules(config.axis_rules, mesh)):
    batch = _batch(task, mesh)
    expected = loss(run_params)
    task.model = model
    np.testing.assert_allclose(loss(params), expected, rtol=1e-6)
