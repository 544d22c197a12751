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
from configs import siglip2_shapes, siglip_shapes
from mmjax import evaluate, export, runs, train
from mmjax.data import packing, shapes
from mmjax.data.transforms import NaFlexPatches, naflex_grid, naflex_patches
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
  sizes = np.broadcast_to(np.array([[h, w], [2, 2]])[:, None], (2, length, 2))
  index = np.stack([np.arange(length) * (np.arange(length) < h * w), np.arange(length) * (np.arange(length) < 4)])
  got = np.asarray(resize_posemb(grid_embedding, sizes, index))
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


@pytest.mark.parametrize("pool", ["map", "gap"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_packed_images_each_give_their_unpacked_embedding(towers, pool, impl):
  """Seven images at budgets of 4 to 16 patches, packed at most three to a row of 16: each image's
  pooled output is the one it has alone, and the batch takes fewer rows."""
  naflex, _, params = towers
  naflex = naflex.clone(pool=pool, attention_impl=impl)
  if pool == "gap":
    params = {k: v for k, v in params.items() if k != "MAPHead_0"}
  rng = np.random.default_rng(3)
  shapes_and_budgets = [((10, 23), 8), ((30, 12), 16), ((16, 16), 4), ((9, 9), 6), ((40, 8), 5), ((12, 20), 16),
                        ((20, 20), 9)]
  images = [naflex_patches(rng.integers(0, 256, shape + (3,), dtype=np.uint8), P, budget, 16)
            for shape, budget in shapes_and_budgets]
  batch = {k: np.stack([image[k] for image in images]) for k in ("patches", "grid")}
  packed = packing.pack_images(batch, per_row=3)
  assert len(packed["image"]["grid"]) < len(images)
  assert len(set(packed["image_slot"])) == len(images)
  out = naflex.apply({"params": params}, packed["image"])[0]
  assert out.shape == (len(packed["image"]["grid"]), 3, WIDTH)
  alone = naflex.apply({"params": params}, batch)[0]
  np.testing.assert_allclose(np.asarray(out).reshape(-1, WIDTH)[packed["image_slot"]], alone, atol=2e-5)


def test_pack_images_places_every_patch_of_every_image():
  rng = np.random.default_rng(4)
  grid = np.array([[2, 3], [1, 1], [4, 4], [3, 1], [2, 2], [1, 5]], np.int32)
  patches = np.zeros((len(grid), 16, 5), np.float32)
  for i, (h, w) in enumerate(grid):
    patches[i, :h * w] = rng.normal(size=(h * w, 5))
  packed = packing.pack_images({"patches": patches, "grid": grid}, per_row=2, divisor=2)
  rows = packed["image"]
  assert len(rows["grid"]) % 2 == 0 and (rows["grid"] >= 0).all()
  for i, slot in enumerate(packed["image_slot"]):
    row, k = divmod(int(slot), 2)
    assert rows["grid"][row, k].tolist() == grid[i].tolist()
    start = int(sum(h * w for h, w in rows["grid"][row, :k]))
    np.testing.assert_array_equal(rows["patches"][row, start:start + grid[i].prod()], patches[i, :grid[i].prod()])
  used = sum(h * w for h, w in rows["grid"].reshape(-1, 2))
  assert used == grid.prod(axis=1).sum() and (rows["grid"].prod(axis=2).sum(axis=1) <= 16).all()


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
  # `python -m mmjax.evaluate --max_patches 4`: the benchmark embeds every image within 4 patches.
  for i, image in enumerate(images):
    (tmp_path / "classes" / f"class{i}").mkdir(parents=True)
    Image.fromarray(image).save(tmp_path / "classes" / f"class{i}" / "0.png")
  result = evaluate.benchmark("zeroshot_classification", str(tmp_path / "classes"), export=str(tmp_path / "export"),
                              batch_size=8, cache_dir=str(tmp_path / "cache"), max_patches=4)
  assert result["model"].endswith("at 4 patches") and result["metrics"]["images"] == 3
  with np.load(tmp_path / "cache" / "max_patches_4" / "images" / f"{0:010d}.npz") as cached:
    small = [naflex_patches(image, 8, 4, 4) for image in images]
    want = loaded.encode_image({k: np.stack([s[k] for s in small]) for k in ("patches", "grid")})
    np.testing.assert_allclose(cached["z"][:3], want, atol=1e-5)
    assert np.abs(want - z).max() > 1e-3  # Another budget embeds differently.


def test_the_default_recipe_takes_a_patch_budget():
  config = siglip_shapes.get_config("max_patches=64")
  task = runs.setup(config).task
  batch = task.dummy_batch(2)["image"]
  assert batch["patches"].shape == (2, 64, 8 * 8 * 3) and batch["grid"].shape == (2, 2)
  assert task.model_config["max_patches"] == 64 and not siglip_shapes.get_config().model.image.get("naflex")
  with pytest.raises(ConfigError, match="model.image.naflex needs data.max_patches"):
    config.data.max_patches = 0
    runs.setup(config)


def _objects(caption: str) -> set[str]:
  return {name for name in shapes.CLASS_NAMES if name in caption}


def test_shapes_scenes_at_an_aspect_ratio_keep_the_square_scenes_and_their_positions():
  square, wide = shapes.ShapesSource(), shapes.ShapesSource(aspect_ratios=(0.5, 2.0))
  assert {wide[i]["image"].shape for i in range(20)} == {(128, 64, 3), (64, 128, 3)}
  checked = 0
  for i in range(80):
    a, b = square[i], wide[i]
    # The same objects on another canvas (the wording, drawn after the layout, may differ).
    assert _objects(a["caption"]) == _objects(b["caption"])
    if len(_objects(b["caption"])) > 1 or b["image"].shape[1] != 128:
      continue
    # Every colour has a channel far above the background and its noise.
    rows, cols = np.nonzero(b["image"].max(axis=-1) > 100)
    assert rows.max() - rows.min() <= 23 and cols.max() - cols.min() <= 23  # Sized by the shorter side.
    if b["caption"].endswith(" at the left"):
      assert cols.max() < 128 / 3 + 1, b["caption"]
      checked += 1
    if b["caption"].endswith(" at the right"):
      assert cols.min() >= 2 * 128 / 3 - 1, b["caption"]
      checked += 1
  assert checked >= 2
  assert shapes.aspect_size(64, 2.0) == (64, 128) and shapes.aspect_size(64, 0.5) == (128, 64)
  with pytest.raises(ConfigError, match="aspect ratio 0"):
    shapes.ShapesSource(aspect_ratios=(0,))


@pytest.fixture(scope="module")
def aspect_tasks():
  """The siglip2_shapes recipe's NaFlex and square tasks, random weights, on a few eval scenes."""
  out = {}
  for naflex in (True, False):
    config = siglip2_shapes.get_config(f"naflex={naflex},locca=False,distill=False")
    config.evals = dict(batch_size=32, zeroshot=dict(templates="shapes", per_class=2),
                        aspect=dict(ratios=(1.0, 2.0), budgets=(16, 64) if naflex else (), per_class=2,
                                    templates="shapes"))
    task = runs.setup(config).task
    params = nn.unbox(task.init(jax.random.key(0), task.dummy_batch(2)))
    out[naflex] = task, params, task.evaluate(params)
  return out


def test_the_aspect_eval_reads_whole_images_at_each_budget_or_centre_crops(aspect_tasks):
  task, params, results = aspect_tasks[True]
  assert {k for k in results if k.startswith("aspect/")} == {"aspect/acc_r1_p16", "aspect/acc_r2_p16",
                                                             "aspect/acc_r1_p64", "aspect/acc_r2_p64"}
  # Square scenes at the training budget are the zero-shot eval's own images, prepared the same way.
  assert results["aspect/acc_r1_p64"] == results["zeroshot/acc"]
  zclass = _class_embeddings(task, params)
  # 2:1 scenes reach the NaFlex tower whole, within 16 patches: embedded here by the model itself.
  images, labels = shapes.class_images(range(len(shapes.CLASSES)), 2, 0, (64, 128))
  cut = [naflex_patches(image, 8, 16, 16) for image in images]
  assert {tuple(c["grid"]) for c in cut} == {(3, 5)}
  zimg = np.asarray(task.model.apply({"params": params}, image={k: np.stack([c[k] for c in cut])
                                                                for k in ("patches", "grid")})[0])
  assert results["aspect/acc_r2_p16"] == pytest.approx(float(np.mean(np.argmax(zimg @ zclass.T, axis=1) == labels)))
  task, params, results = aspect_tasks[False]
  assert {k for k in results if k.startswith("aspect/")} == {"aspect/acc_r1", "aspect/acc_r2"}
  assert results["aspect/acc_r1"] == results["zeroshot/acc"]
  # 2:1 scenes reach the fixed-resolution tower as their centre 64 x 64.
  images, labels = shapes.class_images(range(len(shapes.CLASSES)), 2, 0, (64, 128))
  zimg = task.embed_images(params, images[:, :, 32:96])
  accuracy = float(np.mean(np.argmax(zimg @ _class_embeddings(task, params).T, axis=1) == labels))
  assert results["aspect/acc_r2"] == pytest.approx(accuracy)


def _class_embeddings(task, params):
  """The 48 classes' prompt embeddings averaged over the shapes templates and renormalised, in NumPy."""
  zclass = task.embed_texts(params, [t.format(n) for n in shapes.CLASS_NAMES for t in shapes.CLASS_TEMPLATES])
  zclass = zclass.reshape(len(shapes.CLASS_NAMES), len(shapes.CLASS_TEMPLATES), -1).mean(axis=1)
  return zclass / np.linalg.norm(zclass, axis=1, keepdims=True)


def test_a_packed_training_batch_has_the_unpacked_loss():
  """The siglip2_shapes recipe's batch (scenes at three aspect ratios, each image within a budget drawn
  from 16, 36 and 64 patches, with LocCa's targets) through the task's own data ops: packed four to a
  row, the step's loss, contrastive and LocCa's, is the unpacked one, from fewer rows."""
  import grain
  config = siglip2_shapes.get_config()
  config.data.pack_images = False
  task = runs.setup(config).task
  config = siglip2_shapes.get_config()
  assert config.data.pack_images and config.data.patch_budgets == (16, 36, 64)
  packed_task = runs.setup(config).task
  params = nn.unbox(task.init(jax.random.key(0), task.dummy_batch(2)))
  source, elements = shapes.ShapesSource(aspect_ratios=config.data.aspect_ratios, regions=True), []
  for i in range(32):
    element = source[i]
    for op in task.data_ops():
      random = isinstance(op, grain.transforms.RandomMap)
      element = op.random_map(element, np.random.default_rng(i)) if random else op.map(element)
    elements.append(element)
  batch = jax.tree.map(lambda *rows: np.stack(rows), *elements)
  assert len({int(np.prod(g)) for g in batch["image"]["grid"]}) >= 3  # Mixed sizes.
  packed = packed_task.prepare_batch(batch)
  assert len(packed["image"]["grid"]) <= 24  # Rows come in multiples of the 8 devices.
  key = jax.random.key(1)
  want = task.loss_fn(params, batch, key, train=False)[1]
  got = packed_task.loss_fn(params, packed, key, train=False)[1]
  assert want["locca/referring"] > 0 and want["locca/grounded"] > 0
  for name in ("loss", "contrastive_loss", "locca/caption", "locca/referring", "locca/grounded"):
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
