"""NaFlex (SigLIP 2) image towers: images at their own aspect ratio as padded patch sequences.

The resized position grid is checked against PIL's antialiased bilinear resize, channel by channel;
the tower on a full square grid against the fixed-resolution ViT with the same parameters; padding
against nothing at all (an image's embedding does not depend on the sequence budget or on what else
is in the batch); the patch grid against bisection, as big_vision and HF define it, and the patches
against HF transformers' Siglip2 image processor."""
import math

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

import mmjax
from configs import siglip_shapes
from mmjax import export, runs, train
from mmjax.data.transforms import NaFlexPatches, naflex_grid
from mmjax.errors import ConfigError
from mmjax.models.vit import ViT, resize_posemb
from tests.helpers import logged_losses, tiny_config

G, P, WIDTH = 4, 4, 32  # A 4x4 learned grid; 4-pixel patches.
TOWER = dict(width=WIDTH, depth=2, mlp_dim=64, num_heads=2, patch_size=P, head="none")


def _pil_resize(grid_embedding: np.ndarray, h: int, w: int) -> np.ndarray:
  """[h * w, width]: each channel resized as a float image by PIL (bilinear, which antialiases)."""
  channels = [np.asarray(Image.fromarray(grid_embedding[..., d], mode="F").resize((w, h), Image.BILINEAR))
              for d in range(grid_embedding.shape[-1])]
  return np.stack(channels, axis=-1).reshape(h * w, -1)


@pytest.mark.parametrize("h, w", [(4, 4), (2, 7), (9, 3), (1, 1), (6, 5)])
def test_resized_positions_match_pil_and_padding_takes_the_first(h, w):
  grid_embedding = np.random.default_rng(h * 10 + w).normal(size=(G, G, 8)).astype(np.float32)
  length = h * w + 3
  got = np.asarray(resize_posemb(grid_embedding, np.array([[h, w], [2, 2]]), length))
  np.testing.assert_allclose(got[0, :h * w], _pil_resize(grid_embedding, h, w), atol=1e-5)
  np.testing.assert_allclose(got[0, h * w:], np.broadcast_to(got[0, :1], (3, 8)), atol=1e-6)
  np.testing.assert_allclose(got[1, :4], _pil_resize(grid_embedding, 2, 2), atol=1e-5)


def _patches(image: np.ndarray, budget: int):
  out = NaFlexPatches(P, budget).map({"image": image})["image"]
  return {"patches": out["patches"][None], "grid": out["grid"][None]}


@pytest.fixture(scope="module")
def towers():
  naflex = ViT(**TOWER, naflex=True, posemb_grid=G)
  square = ViT(**TOWER)
  params = nn.unbox(naflex.init(jax.random.key(0), _patches(np.zeros((16, 16, 3), np.uint8), 16))["params"])
  params = jax.tree.map(lambda x: x + 0.05 * np.random.default_rng(x.size).normal(size=x.shape), params)
  return naflex, square, params


def test_a_full_square_grid_is_the_fixed_resolution_vit(towers):
  naflex, square, params = towers
  image = np.random.default_rng(0).integers(0, 256, (G * P, G * P, 3), dtype=np.uint8)
  got = naflex.apply({"params": params}, _patches(image, G * G))[0]
  want = square.apply({"params": params}, (image.astype(np.float32) / 127.5 - 1.0)[None])[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["map", "gap"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_an_embedding_ignores_the_budget_and_its_batch(towers, pool, impl):
  naflex, _, params = towers
  naflex = naflex.clone(pool=pool, attention_impl=impl)
  if pool == "gap":
    params = {k: v for k, v in params.items() if k != "MAPHead_0"}
  rng = np.random.default_rng(1)
  wide, tall = rng.integers(0, 256, (10, 23, 3), dtype=np.uint8), rng.integers(0, 256, (30, 12, 3), dtype=np.uint8)
  alone = naflex.apply({"params": params}, _patches(wide, 24))[0]
  assert _patches(wide, 24)["grid"].tolist() == [[3, 7]]  # 21 tokens and 3 of padding.
  longer = _patches(wide, 24)
  longer["patches"] = np.concatenate([longer["patches"], np.zeros((1, 16, P * P * 3), np.float32)], axis=1)
  roomy = naflex.apply({"params": params}, longer)[0]  # The same image with 19 tokens of padding.
  both = [_patches(wide, 24), _patches(tall, 24)]
  batch = {k: np.concatenate([b[k] for b in both]) for k in ("patches", "grid")}
  together = naflex.apply({"params": params}, batch)[0]
  np.testing.assert_allclose(roomy, alone, atol=1e-5)
  np.testing.assert_allclose(together[:1], alone, atol=1e-5)
  np.testing.assert_allclose(together[1:], naflex.apply({"params": params}, _patches(tall, 24))[0], atol=1e-5)
  padded = {**_patches(wide, 24), "patches": _patches(wide, 24)["patches"].copy()}
  padded["patches"][0, 21:] = 5.0  # Whatever the padding holds.
  np.testing.assert_allclose(naflex.apply({"params": params}, padded)[0], alone, atol=1e-5)


def test_naflex_refuses_images_and_single_token_pools(towers):
  naflex, _, params = towers
  with pytest.raises(ConfigError, match="naflex takes dict"):
    naflex.apply({"params": params}, np.zeros((1, 16, 16, 3), np.float32))
  with pytest.raises(ConfigError, match="naflex pools with 'map' or 'gap'"):
    naflex.clone(pool="tok").init(jax.random.key(0), _patches(np.zeros((8, 8, 3), np.uint8), 4))


def _bisected_grid(height, width, patch, budget):
  """The grid as big_vision and HF define it: bisect for the largest scale (up to 100) whose grid,
  each side rounded up to whole patches, fits the budget."""
  grid = lambda s: (max(1, math.ceil(height * s / patch)), max(1, math.ceil(width * s / patch)))
  low, high = 1e-8, 100.0
  while high - low > 1e-9:
    mid = (low + high) / 2
    low, high = (mid, high) if np.prod(grid(mid)) <= budget else (low, mid)
  return grid(low)


@pytest.mark.parametrize("budget", [1, 16, 64, 256])
def test_the_grid_is_the_largest_at_the_aspect_ratio_that_fits(budget):
  rng = np.random.default_rng(budget)
  for height, width in [*rng.integers(1, 700, (40, 2)).tolist(), (1, 1), (16, 16), (5, 900)]:
    h, w = naflex_grid(height, width, 16, budget)
    assert 1 <= h * w <= budget
    assert (h, w) == _bisected_grid(height, width, 16, budget), (height, width)


def test_patches_match_hf_siglip2_image_processor():
  processing = pytest.importorskip("transformers.models.siglip2.image_processing_siglip2")
  processor = processing.Siglip2ImageProcessor(patch_size=P, max_num_patches=32)
  rng = np.random.default_rng(2)
  for height, width in [(20, 45), (50, 13), (16, 16), (7, 9)]:
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    hf = processor(images=[Image.fromarray(image)], return_tensors="np")
    ours = NaFlexPatches(P, 32).map({"image": image})["image"]
    assert hf["spatial_shapes"][0].tolist() == ours["grid"].tolist()
    n = int(np.prod(ours["grid"]))
    assert hf["pixel_attention_mask"][0].sum() == n
    # HF resizes with torchvision, whose 8-bit bilinear rounds differently from PIL's when shrinking.
    np.testing.assert_allclose(ours["patches"], hf["pixel_values"][0], atol=1 / 127.5 + 1e-6)
    assert np.abs(ours["patches"] - hf["pixel_values"][0]).mean() < 0.3 / 127.5  # At most 30% of values differ.


def test_naflex_training_on_square_images_is_fixed_resolution_training(tmp_path):
  """With the budget and the position grid of the square images' patch grid, NaFlex's data, model
  and step compute what the fixed-resolution recipe does: the same losses, step by step. Its export
  then embeds images of any shape."""
  fixed = tiny_config(total_steps=4, log_every=1)
  naflex = tiny_config(total_steps=4, log_every=1)
  side = naflex.data.image_size // naflex.model.image.patch_size
  naflex.model.image.update(naflex=True, posemb_grid=side)
  naflex.data.max_patches = side * side
  for config, name in ((fixed, "fixed"), (naflex, "naflex")):
    train.train(config, str(tmp_path / name))
  np.testing.assert_allclose(logged_losses(tmp_path / "naflex"), logged_losses(tmp_path / "fixed"), rtol=2e-5)
  loaded = mmjax.load(export.export(str(tmp_path / "naflex"), str(tmp_path / "export")))
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((20, 70, 3), (64, 9, 3), (32, 32, 3))]
  batch = loaded.preprocess(images)
  assert batch["grid"].tolist() == [list(_bisected_grid(*image.shape[:2], 8, side * side)) for image in images]
  assert batch["grid"].tolist()[2] == [4, 4] and batch["patches"].shape == (3, side * side, 8 * 8 * 3)
  z = loaded.encode_image(images)
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
  alone = [loaded.encode_image([image])[0] for image in images]  # Each image's embedding, whatever its batch.
  np.testing.assert_allclose(z, np.stack(alone), atol=1e-5)


def test_the_default_recipe_takes_a_patch_budget():
  config = siglip_shapes.get_config("max_patches=64")
  task = runs.setup(config).task
  batch = task.dummy_batch(2)["image"]
  assert batch["patches"].shape == (2, 64, 8 * 8 * 3) and batch["grid"].shape == (2, 2)
  assert task.model_config["max_patches"] == 64 and not siglip_shapes.get_config().model.image.get("naflex")
  with pytest.raises(ConfigError, match="model.image.naflex needs data.max_patches"):
    config.data.max_patches = 0
    runs.setup(config)
