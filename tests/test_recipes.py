"""Every recipe in configs/ builds, and its full training step lowers on an 8-device mesh; recipe
arguments (`mmjax.config.parse_arg`) are typed and every documented one loads."""
import glob
import importlib.util
import os
import re
import subprocess
import sys

import jax
import ml_collections
import pytest

from mmjax import config as mmjax_config, parallel
from mmjax.errors import ConfigError
from mmjax.runs import lower_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "[a-z]*.py")))
# Recipes built from an export's model_config.json; tests/test_finetune.py trains finetune.py on one.
NEED_AN_EXPORT = ("finetune.py",)
# Recipe arguments that change what trains (the default of each file is covered too).
VARIANTS = [("llava_shapes.py", "lora=True"), ("prompt_shapes.py", "method=cocoop"),
            ("prompt_shapes.py", "method=maple"), ("prompt_shapes.py", "method=coprompt"),
            ("perceiver_shapes.py", "kind=vit")]


def _documented_arguments():
  """Every `configs/<recipe>.py:<argument>` that the recipes' docstrings, README.md and docs/ spell out."""
  found = set()
  for path in RECIPES + [os.path.join(REPO, "README.md")] + glob.glob(os.path.join(REPO, "docs", "*.md")):
    with open(path, encoding="utf-8") as f:
      found.update(re.findall(r"configs/[a-z0-9_]+\.py:[A-Za-z0-9_=.,]*[A-Za-z0-9_]", f.read()))
  return sorted(found)


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


@pytest.mark.parametrize("path,arg", [(p, None) for p in RECIPES if os.path.basename(p) not in NEED_AN_EXPORT] +
                         [(os.path.join(REPO, "configs", name), arg) for name, arg in VARIANTS],
                         ids=lambda x: os.path.basename(x) if isinstance(x, str) else str(x))
def test_recipe_lowers(path, arg):
  module = _load(path)
  assert "python -m mmjax.train --config " in module.__doc__
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


def test_parse_arg_types_each_value_after_its_default():
  args = mmjax_config.parse_arg("stage=1, lr=3e-4,name=coop,lora,rag=false", stage=2, lr=1.0, name="x",
                                lora=False, rag=True, ema=False)
  assert args.to_dict() == dict(stage=1, lr=3e-4, name="coop", lora=True, rag=False, ema=False)
  assert type(args.stage) is int and type(args.lr) is float
  for text, want in (("True", True), ("true", True), ("1", True), ("False", False), ("false", False), ("0", False)):
    assert mmjax_config.parse_arg(f"lora={text}", lora=not want).lora is want
  assert mmjax_config.parse_arg(None, stage=2).stage == mmjax_config.parse_arg("", stage=2).stage == 2


@pytest.mark.parametrize("arg,key", [("stag=1", "stag"), ("stage1", "stage1"), ("lora,rank=8", "rank")])
def test_parse_arg_names_an_unknown_key_and_the_known_ones(arg, key):
  with pytest.raises(ConfigError, match=rf"'{key}' is unknown; the recipe takes stage=2, lora=False"):
    mmjax_config.parse_arg(arg, stage=2, lora=False)


@pytest.mark.parametrize("arg", ["stage=two", "stage=1.5", "stage", "lora=yes", "lr=fast"])
def test_parse_arg_names_a_value_its_default_type_rejects(arg):
  key = arg.partition("=")[0]
  with pytest.raises(ConfigError, match=rf"'{arg}': {key} needs a valid (int|bool|float) .*the recipe takes stage=2"):
    mmjax_config.parse_arg(arg, stage=2, lora=False, lr=1.0)


def test_arguments_are_documented():
  want = {"llava_shapes.py:stage=1", "llava_shapes.py:lora=True", "llava_shapes.py:rag=True",
          "llava_vitl14_llama.py:stage=1", "prompt_shapes.py:method=coop", "perceiver_shapes.py:kind=vit",
          "fusion_shapes.py:fusion=late"}
  assert {f"configs/{spec}" for spec in want} <= set(_documented_arguments())


@pytest.mark.parametrize("spec", _documented_arguments())
def test_documented_recipe_arguments_load(spec):
  assert isinstance(mmjax_config.load(os.path.join(REPO, spec)), ml_collections.ConfigDict)


def test_recipe_arguments_set_what_they_name():
  load = lambda spec: mmjax_config.load(os.path.join(REPO, "configs", spec))
  assert load("llava_shapes.py:stage=1").optim.frozen == (r"^vision/", r"^lm/")
  lora = load("llava_shapes.py:lora")  # A bare bool key is True.
  assert lora.adapt.method == "lora" and lora.init_from == (("base", "runs/llava_stage1"),)
  assert load("llava_shapes.py:rag=True,stage=1").data.rag.k == 2
  assert load("llava_vitl14_llama.py:stage=1").optim.frozen == (r"^vision/", r"^lm/")
  assert load("llava_vitl14_llama.py").optim.frozen == (r"^vision/",)
  assert load("fusion_shapes.py:fusion=early").model.fusion == "early"
  assert load("perceiver_shapes.py:kind=vit").model.kind == "vit"
  assert load("prompt_shapes.py:method=lora").prompt.method == "template"


@pytest.mark.parametrize("spec,key", [("llava_shapes.py:stage=3", "stage=3"),
                                      ("llava_shapes.py:stage=1,lora", "lora=True"),
                                      ("llava_shapes.py:stage1", "'stage1' is unknown"),
                                      ("llava_vitl14_llama.py:stage=0", "stage=0"),
                                      ("fusion_shapes.py:fusion=middle", "fusion='middle'"),
                                      ("perceiver_shapes.py:kind=resnet", "kind='resnet'"),
                                      ("prompt_shapes.py:method=vpt", "method='vpt'"),
                                      ("prompt_shapes.py:coop", "'coop' is unknown")])
def test_recipe_rejects_a_bad_argument_by_name(spec, key):
  with pytest.raises(ConfigError, match=re.escape(key)):
    mmjax_config.load(os.path.join(REPO, "configs", spec))
