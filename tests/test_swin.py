"""Swin against a random-weight HF transformers `SwinModel` (CPU torch); as a two-tower and a VLM image tower."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import models, parallel
from mmjax.config import load, swin_tower
from mmjax.errors import ConfigError, ConversionError
from mmjax.interop.hf_swin import from_hf_swin
from mmjax.models.swin import Swin, shifted_window_mask
from mmjax.runs import lower_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (image size, patch): 16 x 16 then 8 x 8 tokens, whole windows; 10 x 10 then 5 x 5: padded windows
# and an odd map before the merge.
CASES = {"whole_windows": (32, 2), "padded": (40, 4)}


@pytest.fixture(scope="module")
def transformers():
  pytest.importorskip("torch", reason="Swin parity needs torch: pip install -e '.[interop]'")
  return pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[interop]'")


def _hf_swin(transformers, image_size, patch_size, seed=0):
  import torch

  config = transformers.SwinConfig(image_size=image_size, patch_size=patch_size, embed_dim=16, depths=[2, 2],
                                   num_heads=[2, 4], window_size=4, mlp_ratio=2.0)
  torch.manual_seed(seed)
  model = transformers.SwinModel(config).eval()
  with torch.no_grad():  # Every parameter random: biases, norms and bias tables are not left at 0 or 1.
    for p in model.parameters():
      p.normal_(0.0, 0.3)
  return model


@pytest.mark.parametrize("case", CASES)
def test_swin_matches_hf_transformers(transformers, case):
  import torch

  image_size, patch_size = CASES[case]
  hf = _hf_swin(transformers, image_size, patch_size)
  tower, params = from_hf_swin(hf)
  images = np.random.default_rng(0).uniform(-1, 1, (2, image_size, image_size, 3)).astype(np.float32)
  with torch.no_grad():
    want = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  module = Swin(**{k: v for k, v in tower.items() if k not in ("arch", "image_size")})
  pooled, aux = module.apply({"params": params}, jnp.asarray(images))
  np.testing.assert_allclose(aux["encoded"], want.last_hidden_state.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(pooled, want.pooler_output.numpy(), rtol=1e-4, atol=1e-4)


def test_shifted_window_mask_separates_wrapped_regions():
  """8 x 8 map, window 4, shift 2: written out, the last window holds 4 regions of 2 x 2 tokens."""
  mask = shifted_window_mask(8, 8, 4, 2)
  assert mask.shape == (4, 16, 16)
  assert not mask[0].any()  # The top-left window wraps nothing.
  rows, cols = np.divmod(np.arange(16), 4)
  region = (rows >= 2) * 2 + (cols >= 2)
  np.testing.assert_array_equal(mask[3] == 0, region[:, None] == region[None, :])


def test_hf_config_outside_what_swin_supports_is_a_conversion_error(transformers):
  config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2], num_heads=[2],
                                   window_size=4, use_absolute_embeddings=True)
  with pytest.raises(ConversionError, match="use_absolute_embeddings"):
    from_hf_swin(transformers.SwinModel(config))


def test_swin_is_a_two_tower_image_tower():
  config = dict(embed_dim=24, temperature_init=10.0, bias_init=-10.0, image_size=32,
                image=dict(arch="swin", width=16, depths=(2, 2), num_heads=(2, 4), window_size=4, patch_size=2,
                           head="dense"),
                text=dict(vocab_size=40, width=24, depth=1, mlp_dim=48, num_heads=2, max_len=8))
  model = models.build(config)
  images, text = jnp.zeros((2, 32, 32, 3)), jnp.ones((2, 8), jnp.int32)
  params = model.init(jax.random.key(0), image=images, text=text)["params"]
  zimg, ztxt, _ = model.apply({"params": params}, image=images, text=text)
  assert zimg.shape == ztxt.shape == (2, 24)
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)
  assert "stage1_block1" in params["img"] and "merge1" in params["img"]


@pytest.mark.parametrize("recipe", ["llava_shapes.py", "flamingo_shapes.py", "blip2_shapes.py"])
def test_swin_is_a_vlm_vision_tower(recipe):
  config = load(os.path.join(REPO, "configs", recipe))
  model = config.model.to_dict()  # Replaced whole: vision_layer changes type (int -> "encoded").
  model["vision"] = swin_tower(width=16, depths=(2, 2), num_heads=(2, 4), window_size=4, patch_size=4)
  if model["kind"] == "llava":
    model["vision_layer"] = "encoded"
  config.model = model
  lowered, abstract = lower_train_step(config, parallel.make_mesh(config.mesh))
  assert lowered.compiler_ir() is not None
  assert "stage1_block1" in abstract["params"]["vision"]


def test_llava_with_swin_needs_the_encoded_tokens():
  config = load(os.path.join(REPO, "configs", "llava_shapes.py"))
  config.model.vision = swin_tower(width=16, depths=(2, 2), num_heads=(2, 4), window_size=4, patch_size=4)
  with pytest.raises(ConfigError, match="vision_layer='encoded'"):
    lower_train_step(config, parallel.make_mesh(config.mesh))


def test_swin_token_count_pads_patches_and_odd_maps():
  swin = Swin(width=8, depths=(1, 1, 1), num_heads=(1, 1, 1), window_size=2, patch_size=4)
  for size in (32, 36, 44):
    _, aux = jax.eval_shape(lambda x: swin.init_with_output(jax.random.key(0), x)[0],
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    assert aux["encoded"].shape[1] == swin.num_tokens(size)
  assert [swin.num_tokens(s) for s in (32, 36, 44)] == [4, 9, 9]  # 8 -> 2; 9 -> 5 -> 3; 11 -> 6 -> 3.
