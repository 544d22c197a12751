"""Every recipe in configs/ builds, and its full training step lowers on an 8-device mesh."""
import glob
import importlib.util
import os

import flax.linen as nn
import jax
import pytest

from mmjax import parallel, tasks
from mmjax.train import make_train_step, sharded_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "[a-z]*.py")))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_recipes_are_found():
  names = {os.path.basename(p) for p in RECIPES}
  assert {"siglip_shapes.py", "clip_shapes.py", "clip_b32.py", "siglip_b16.py", "siglip_so400m.py", "lm_shapes.py",
          "llava_shapes.py", "blip2_shapes.py", "flamingo_shapes.py", "llava_vitl14_llama.py",
          "flamingo_vitl14.py"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_lowers(path):
  module = _load(path)
  assert "python -m mmjax.train --config configs/" in module.__doc__
  config = module.get_config()
  if config.task == "contrastive":
    config.data.tokenizer = "shapes"  # Scale recipes name the user's tokenizer; the vocab size is set.
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.axis_rules(config.axis_rules, mesh)
  task = tasks.get(config.task)(config, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract, shardings, tx, lr, _ = sharded_state(task, config, mesh, rules)
    step = make_train_step(task, tx, lr, shardings, mesh)
    batch_sharding = parallel.batch_sharding(mesh)
    # The task's own example batch, at the recipe's batch size, as abstract global arrays.
    batch = {k: jax.ShapeDtypeStruct((config.data.batch_size,) + v.shape[1:], v.dtype, sharding=batch_sharding)
             for k, v in task.dummy_batch(1).items()}
    lowered = step.lower(abstract, batch, jax.random.key(0))
  assert lowered.compiler_ir() is not None
  if mesh.shape.get("fsdp", 1) > 1:  # FSDP recipes split every large matrix over `fsdp`.
    largest = max(jax.tree.leaves(abstract["params"]), key=lambda x: x.size)
    assert "fsdp" in str(largest.sharding.spec)
