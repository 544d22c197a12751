"""`mmjax.models.build(task.model_config)` rebuilds every task's model, from the config as JSON."""
import importlib
import json

import flax
import jax
import pytest

from mmjax import models, parallel, tasks
from mmjax.config import tower
from mmjax.errors import ConfigError
from mmjax.models.decoder import DECODER_VARIANTS, build_decoder
from tests.helpers import tiny_config, tiny_generative_recipe

TINY_LM = {"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}
TINY_VISION = {"width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2}
TINY_IMAGE = tower(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, pool="map")


def _recipe(name, **model):
  c = importlib.import_module(f"configs.{name}").get_config()
  c.model = model
  return c


def _generative(name, **overrides):
  lm = {f"model.{k}" if name == "lm_shapes" else f"model.lm.{k}": v for k, v in TINY_LM.items()}
  vision = {} if name == "lm_shapes" else {f"model.vision.{k}": v for k, v in TINY_VISION.items()}
  return tiny_generative_recipe(name, **lm, **vision, **overrides)


def _prompt_learning():
  c = importlib.import_module("configs.prompt_shapes").get_config()
  c.model, c.init_from = tiny_config().model, ()
  c.data.update(image_size=32, shots=1, test_per_class=1)
  return c


CONFIGS = {
    "contrastive": tiny_config,
    "prompt_learning": _prompt_learning,
    "lm": lambda: _generative("lm_shapes"),
    "llava": lambda: _generative("llava_shapes"),
    "flamingo": lambda: _generative("flamingo_shapes", **{"model.perceiver.mlp_dim": 32, "model.xattn.mlp_dim": 32}),
    "blip2": lambda: _generative("blip2_shapes", **{"model.qformer.width": 16, "model.qformer.mlp_dim": 32}),
    "perceiver_io": lambda: _recipe("perceiver_shapes", kind="perceiver_io", patch_size=8, num_bands=2, perceiver=dict(
        num_latents=4, width=16, num_iterations=1, self_attention_depth=1, num_heads=2, mlp_dim=32)),
    "vit": lambda: _recipe("perceiver_shapes", kind="vit", image=TINY_IMAGE),
    "fusion": lambda: _recipe("fusion_shapes", fusion="cross", fusion_depth=1, fusion_heads=2, fusion_mlp_dim=32,
                              image=TINY_IMAGE, text=tower(width=32, depth=1, mlp_dim=64, num_heads=2)),
}


def _param_shapes(task):
  params = jax.eval_shape(task.init, jax.random.key(0), task.dummy_batch(2))
  return jax.tree.map(lambda x: x.shape, flax.linen.meta.unbox(params))


@pytest.mark.parametrize("name", CONFIGS)
def test_build_rebuilds_the_task_model_from_its_json_model_config(name):
  config = CONFIGS[name]()
  task = tasks.get(config.task)(config, parallel.make_mesh(config.mesh))
  model_config = json.loads(json.dumps(task.model_config))
  built = _param_shapes(task)
  task.model = models.build(model_config)
  assert _param_shapes(task) == built


def test_build_leaves_the_adaptation_to_adapt_wrap():
  config = _generative("llava_shapes")
  config.adapt = dict(method="lora", targets=((r"^lm/.*query/kernel$", 2),), alpha=4.0, dropout=0.0, act="gelu")
  config.optim.frozen = (r"^base/",)
  task = tasks.get(config.task)(config, parallel.make_mesh(config.mesh))
  assert task.model_config["adapt"]["method"] == "lora"
  assert models.build(task.model_config) == task.model.base


def test_build_names_an_unknown_kind():
  with pytest.raises(ConfigError, match=r"model.kind='vlm'; known: \['blip2', 'flamingo', 'fusion', 'llava', 'lm'"):
    models.build({"kind": "vlm"})


@pytest.mark.parametrize("variant", DECODER_VARIANTS)
def test_decoder_variants_build(variant):
  decoder = build_decoder({"variant": variant, "depth": 1})
  assert decoder.depth == 1 and decoder.width == DECODER_VARIANTS[variant]["width"]
