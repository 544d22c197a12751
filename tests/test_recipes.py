"""Every recipe in configs/ builds, and its full training step lowers on an 8-device mesh."""
import glob
import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from mmjax import parallel
from mmjax.train import lower_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "[a-z]*.py")))
# Recipe arguments that change what trains (the default of each file is covered too).
VARIANTS = [("llava_shapes.py", "lora"), ("prompt_shapes.py", "cocoop"), ("prompt_shapes.py", "maple"),
            ("prompt_shapes.py", "coprompt"), ("perceiver_shapes.py", "vit")]


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_recipes_are_found():
  names = {os.path.basename(p) for p in RECIPES}
  assert {"siglip_shapes.py", "clip_shapes.py", "clip_b32.py", "siglip_b16.py", "siglip_so400m.py", "lm_shapes.py",
          "llava_shapes.py", "blip2_shapes.py", "flamingo_shapes.py", "llava_vitl14_llama.py",
          "flamingo_vitl14.py", "prompt_shapes.py", "lit_shapes.py"} <= names


@pytest.mark.parametrize("path,arg", [(p, None) for p in RECIPES] +
                         [(os.path.join(REPO, "configs", name), arg) for name, arg in VARIANTS],
                         ids=lambda x: os.path.basename(x) if isinstance(x, str) else str(x))
def test_recipe_lowers(path, arg):
  module = _load(path)
  assert "python -m mmjax.train --config configs/" in module.__doc__
  config = module.get_config(arg)
  if config.task == "contrastive":
    config.data.tokenizer = "shapes"  # Scale recipes name the user's tokenizer; the vocab size is set.
  mesh = parallel.make_mesh(config.mesh)
  lowered, abstract = lower_train_step(config, mesh)
  assert lowered.compiler_ir() is not None
  if mesh.shape.get("fsdp", 1) > 1:  # FSDP recipes split every large matrix over `fsdp`.
    largest = max(jax.tree.leaves(abstract["params"]), key=lambda x: x.size)
    assert "fsdp" in str(largest.sharding.spec)


def test_llava_vision_layer_takes_an_index_or_encoded_from_the_command_line():
  script = ("from absl import app; from ml_collections import config_flags; "
            "c = config_flags.DEFINE_config_file('config'); "
            "app.run(lambda _: print(repr(c.value.model.vision_layer)))")
  for value, want in (("encoded", "'encoded'"), ("-3", "-3")):
    out = subprocess.run([sys.executable, "-c", script, "--config", os.path.join(REPO, "configs", "llava_shapes.py"),
                          f"--config.model.vision_layer={value}"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == want, out.stderr[-1000:]
