"""LocCa (SigLIP 2's decoder loss): the shapes scenes' boxes against their own pixels, the packed
decoder targets against the tokenizer and the box binning, boxes through a centre crop against the
crop itself, the folder source's JSONL boxes, the decoder's masks (its image's tokens, its own
sequence), and the grounding metric against pixel counts."""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from mmjax import models
from mmjax.data import folder, locca, packing, shapes
from mmjax.data.tokenizer import default_shapes_tokenizer
from mmjax.data.transforms import ResizeImage, naflex_patches
from mmjax.errors import ConfigError, DataError
from mmjax.evals import grounding


def _object_pixels(label_map, obj):
  return np.argwhere(label_map == 1 + obj.colour * len(shapes.SHAPES) + obj.shape)


@pytest.mark.parametrize("size", [64, (40, 80), (96, 48)])
def test_scene_boxes_bound_each_objects_pixels(size):
  for i in range(30):
    rng = shapes._rng(0, 99, i)
    objects, boxes = shapes._scene(rng, shapes.CLASSES, 1 + i % 3), []
    _, label_map = shapes._render(rng, objects, size, labels=True, boxes=boxes)
    h, w = label_map.shape
    for obj, (x0, y0, x1, y1) in zip(objects, boxes):
      pixels = _object_pixels(label_map, obj)
      (top, left), (bottom, right) = pixels.min(axis=0), pixels.max(axis=0) + 1
      assert x0 * w <= left and right <= x1 * w and y0 * h <= top and bottom <= y1 * h
      if len(objects) == 1 and shapes.SHAPES[obj.shape] in ("circle", "diamond", "cross"):  # Reach its edges.
        np.testing.assert_allclose([left, top, right, bottom], [x0 * w, y0 * h, x1 * w, y1 * h], atol=1e-9)


def test_sources_with_regions_draw_the_same_scenes():
  plain, with_regions = shapes.ShapesSource(aspect_ratios=(0.5, 2.0)), shapes.ShapesSource(aspect_ratios=(0.5, 2.0),
                                                                                          regions=True)
  twins, twins_regions = shapes.ShapesSource(twins=True), shapes.ShapesSource(twins=True, regions=True)
  for i in range(5):
    a, b = plain[i], with_regions[i]
    assert a["caption"] == b["caption"] and np.array_equal(a["image"], b["image"])
    assert 1 <= len(b["regions"]) <= 3 and all(r["text"].startswith("the ") for r in b["regions"])
    for a, b in zip(twins[i], twins_regions[i]):
      assert np.array_equal(a["image"], b["image"]) and len(b["regions"]) >= 1
  assert repr(plain) != repr(with_regions)


def test_grounding_set_names_one_seen_object_of_each_scene_by_its_class():
  data = shapes.grounding_set(n=12, image_size=48)
  assert data["images"].shape == (12, 48, 48, 3) and data["boxes"].shape == (12, 4)
  held_out = shapes.held_out_combos(0, 0.2)
  for image, text, (x0, y0, x1, y1) in zip(data["images"], data["texts"], data["boxes"]):
    assert tuple(text.split()[1:]) not in held_out  # The training distribution's classes.
    colour = shapes.COLOURS[text.split()[1]]
    inside = image[int(y0 * 48):int(np.ceil(y1 * 48)), int(x0 * 48):int(np.ceil(x1 * 48))].reshape(-1, 3)
    near = np.abs(inside.astype(int) - colour).max(axis=1) <= shapes.COLOUR_JITTER + shapes.NOISE
    assert near.mean() > 0.2  # The named object's colour fills much of its box.


@pytest.fixture(scope="module")
def tokenizer():
  return default_shapes_tokenizer()


def _ids(tokenizer, text):
  row = list(tokenizer.encode(text, 64))
  return row[:row.index(tokenizer.eos_id)]


def test_targets_pack_caption_referring_and_grounded_sequences(tokenizer):
  vocab = locca.LocCaVocab(tokenizer.vocab_size, 32)
  regions = [dict(text="the red circle", box=(0.1, 0.2, 0.4, 0.55)), dict(text="the blue star", box=(0.5, 0.0, 1.0, 0.3))]
  caption = "a small red circle and a blue star"
  element = dict(image=np.zeros((8, 8, 3), np.uint8), caption=caption, regions=regions)
  eos, T = tokenizer.eos_id, tokenizer.vocab_size
  chosen = set()
  for seed in range(8):
    out = locca.LocCaTargets(tokenizer, vocab, 40).random_map(element, np.random.default_rng(seed))
    assert "regions" not in out and "caption" in out  # The caption stays for the text tower's Tokenize.
    tokens, segments, weights = out["locca"], out["locca_segments"], out["locca_weights"]
    sequences = [tokens[segments == k].tolist() for k in (1, 2, 3)]
    targets = [tokens[(segments == k) & (weights > 0)].tolist() for k in (1, 2, 3)]
    assert sequences[0] == [T] + _ids(tokenizer, caption) + [eos] and targets[0] == sequences[0][1:]
    ref_text, ref_box = sequences[1][1:-4], sequences[1][-4:]
    region = next(r for r in regions if _ids(tokenizer, r["text"]) + [eos] == ref_text)
    assert sequences[1][0] == T + 1 and targets[1] == ref_box
    assert ref_box == [T + 3 + min(int(v * 32), 31) for v in region["box"]]  # floor(v * bins), after the tasks.
    grounded = next(r for r in regions if [T + 3 + min(int(v * 32), 31) for v in r["box"]] == sequences[2][1:5])
    assert sequences[2][0] == T + 2 and targets[2] == _ids(tokenizer, grounded["text"]) + [eos]
    assert np.all(segments[:sum(map(len, sequences))] > 0) and np.all(segments[sum(map(len, sequences)):] == 0)
    chosen.add((region["text"], grounded["text"]))
  assert len(chosen) > 1  # Each draws its region at random.
  alone = locca.LocCaTargets(tokenizer, vocab, 40).random_map(dict(element, regions=[]), np.random.default_rng(0))
  assert set(alone["locca_segments"][alone["locca_segments"] > 0]) == {1}
  long_caption = " and ".join(["a small red circle at the top left"] * 8)
  out = locca.LocCaTargets(tokenizer, vocab, 32).random_map(dict(element, caption=long_caption),
                                                             np.random.default_rng(0))
  caption_tokens = out["locca"][out["locca_segments"] == 1]
  assert caption_tokens[-1] == eos and len(caption_tokens) > 2 and set(out["locca_segments"][-8:]) == {3}


def test_boxes_follow_the_centre_crop_of_a_fixed_resolution_tower():
  canvas, size = np.zeros((60, 120, 3), np.uint8), 48
  regions = [dict(text="middle", box=(0.4, 0.25, 0.6, 0.75)), dict(text="edge", box=(0.2, 0.1, 0.35, 0.5)),
             dict(text="gone", box=(0.0, 0.1, 0.2, 0.5))]
  kept = locca.square_crop_regions(regions, 60, 120)
  assert [r["text"] for r in kept] == ["middle", "edge"]  # "edge" is 2/3 inside the crop, "gone" not at all.
  for region, got in zip(regions, kept):  # Each box drawn, then cropped as the tower's input is.
    x0, y0, x1, y1 = region["box"]
    image = canvas.copy()
    image[round(y0 * 60):round(y1 * 60), round(x0 * 120):round(x1 * 120)] = 255
    cropped = ResizeImage(size).map({"image": image})["image"]
    rows, cols = np.nonzero(cropped[..., 0] > 127)
    want = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]) / size
    np.testing.assert_allclose(got["box"], want, atol=1.5 / size)


def test_folder_captions_take_pixel_boxes_from_jsonl(tmp_path):
  Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(tmp_path / "a.png")
  lines = [dict(image="a.png", caption="a mug", regions=[dict(text="the mug", box=[10, 5, 60, 45])]),
           dict(image="a.png", caption="nothing marked")]
  path = tmp_path / "c.jsonl"
  path.write_text("\n".join(map(json.dumps, lines)) + "\n")
  source = folder.CaptionFolderSource(path, regions=True)
  assert source[0]["regions"] == [dict(text="the mug", box=(0.1, 0.1, 0.6, 0.9))] and source[1]["regions"] == []
  assert "regions" not in folder.CaptionFolderSource(path)[0]
  bad = dict(image="a.png", caption="x", regions=[dict(text="the mug", box=[60, 5, 10, 45])])
  path.write_text(json.dumps(lines[0]) + "\n" + json.dumps(bad) + "\n")
  with pytest.raises(DataError, match=r"c.jsonl:2: regions: box \[60, 5, 10, 45\] needs x0 < x1"):
    folder.CaptionFolderSource(path, regions=True)
  (tmp_path / "c.csv").write_text("image,caption\na.png,x\n")
  with pytest.raises(ConfigError, match="c.csv: region boxes"):
    folder.CaptionFolderSource(tmp_path / "c.csv", regions=True)


TINY = dict(kind="two_tower", embed_dim=16, image_size=16, max_patches=16,
            image=dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, naflex=True, posemb_grid=4,
                       pool="map", head="none"),
            text=dict(width=16, depth=1, mlp_dim=32, num_heads=2, max_len=8, vocab_size=20, head="dense"),
            locca=dict(width=16, depth=2, mlp_dim=32, num_heads=2, max_len=12, box_bins=8))


def test_the_decoder_reads_its_own_image_and_its_own_sequence():
  model = models.build(TINY)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((16, 16, 3), (8, 20, 3), (24, 8, 3))]
  patches = [naflex_patches(image, 4, budget, 16) for image, budget in zip(images, (4, 6, 5))]
  unpacked = jax.tree.map(lambda *rows: np.stack(rows), *patches)
  areas = np.prod(unpacked["grid"], axis=1)
  tokens = rng.integers(0, model.locca["vocab_size"], (3, 12)).astype(np.int32)
  segments = np.array([[1] * 5 + [2] * 4 + [3] * 3, [1] * 12, [1] * 6 + [0] * 6], np.int32)
  locca_in = {"tokens": tokens, "segments": segments}
  params = nn.unbox(model.init(jax.random.key(0), image=unpacked, locca=locca_in)["params"])
  apply = jax.jit(lambda image, locca, image_slot: model.apply({"params": params}, image=image, locca=locca,
                                                                image_slot=image_slot)[2]["locca/logits"])
  logits = lambda image, locca, image_slot=None: np.asarray(apply(image, locca, image_slot))
  want = logits(unpacked, locca=locca_in)
  packed = packing.pack_images(unpacked, per_row=3)
  assert len(packed["image"]["grid"]) == 1  # All three in one row of 16 patches.
  np.testing.assert_allclose(logits(packed["image"], locca=locca_in, image_slot=packed["image_slot"]), want,
                             rtol=1e-5, atol=1e-5)
  noisy = jax.tree.map(np.copy, unpacked)
  noisy["patches"][1, areas[1]:] = rng.normal(size=noisy["patches"][1, areas[1]:].shape)  # Image 1's padding.
  np.testing.assert_allclose(logits(noisy, locca=locca_in), want, rtol=1e-5, atol=1e-5)
  other = dict(locca_in, tokens=tokens.copy())
  other["tokens"][0, 5:] = (other["tokens"][0, 5:] + 1) % model.locca["vocab_size"]  # Row 0's later sequences.
  changed = logits(unpacked, locca=other)
  np.testing.assert_allclose(changed[0, :5], want[0, :5], rtol=1e-5, atol=1e-5)
  assert not np.allclose(changed[0, 5:], want[0, 5:])
  # Each sequence starts at position 0: row 0's second sequence reads as row 1's start would.
  restart = dict(tokens=np.stack([tokens[0], np.r_[tokens[0, 5:9], tokens[0, :8]]]), segments=np.stack(
      [segments[0], np.r_[[1] * 4, [2] * 8]]).astype(np.int32))
  two = logits(jax.tree.map(lambda x: x[[0, 0]], unpacked), locca=restart)
  np.testing.assert_allclose(two[1, :4], two[0, 5:9], rtol=1e-5, atol=1e-5)
  with pytest.raises(ConfigError, match="model.locca: missing"):
    models.build(dict(TINY, locca=dict(width=16)))


def test_every_patch_knows_its_centre_in_its_image():
  vit = models.ViT(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, naflex=True, posemb_grid=4, head="none")
  grid = np.array([[[2, 3], [3, 1], [0, 0]]], np.int32)  # Two images packed in a row of 12 patches.
  image = {"patches": np.zeros((1, 12, 48), np.float32), "grid": grid}
  params = vit.init(jax.random.key(0), image)["params"]
  centres = np.asarray(vit.apply({"params": params}, image)[1]["centres"])[0]
  want = [((k // w + 0.5) / h, (k % w + 0.5) / w) for h, w in grid[0, :2] for k in range(h * w)]
  np.testing.assert_allclose(centres[:9], want, rtol=1e-6)
  square = models.ViT(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, head="none", pool="tok")
  images = np.zeros((1, 8, 12, 3), np.float32)
  got = square.apply({"params": square.init(jax.random.key(0), images)["params"]}, images)[1]["centres"][0]
  np.testing.assert_allclose(got, [(0.5, 0.5)] + [((i + 0.5) / 2, (j + 0.5) / 3) for i in range(2) for j in range(3)])


def test_grounding_iou_and_the_centre_baseline_match_pixel_counts():
  rng = np.random.default_rng(0)
  start, size = rng.uniform(0, 0.7, (200, 2)), rng.uniform(0.1, 0.3, (200, 2))
  true = np.concatenate([start, start + size], axis=1)
  predicted = np.clip(true + rng.normal(0, 0.05, true.shape), 0, 1)
  predicted[:, 2:] = np.maximum(predicted[:, 2:], predicted[:, :2] + 0.01)

  def pixel_iou(a, b, n=500):
    grid = (np.arange(n) + 0.5) / n
    inside = lambda box: ((grid[None, :] >= box[0]) & (grid[None, :] < box[2]) & (grid[:, None] >= box[1])
                          & (grid[:, None] < box[3]))
    return (inside(a) & inside(b)).sum() / (inside(a) | inside(b)).sum()

  ious = np.array([pixel_iou(p, t) for p, t in zip(predicted, true)])
  np.testing.assert_allclose(grounding.box_iou(predicted, true), ious, atol=0.02)
  got = grounding.evaluate(predicted, true)
  assert got["miou"] == pytest.approx(ious.mean(), abs=0.005)
  assert abs(got["acc@0.5"] - np.mean(ious >= 0.5)) <= 0.02
  w, h = (true[:, 2] - true[:, 0]).mean(), (true[:, 3] - true[:, 1]).mean()
  centre = np.array([0.5 - w / 2, 0.5 - h / 2, 0.5 + w / 2, 0.5 + h / 2])
  assert got["centre_acc@0.5"] == pytest.approx(np.mean([pixel_iou(centre, t) >= 0.5 for t in true]), abs=0.02)
