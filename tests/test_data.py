"""Shapes source and eval sets, image files, and the grain loader."""
import json
import os
import re

import numpy as np
import jax
import pytest
from PIL import Image

from mmjax.checkpoint import Checkpointer
from mmjax.config import base_config
from mmjax.data import folder, pipeline, shapes, transforms
from mmjax.data.tokenizer import default_shapes_tokenizer
from mmjax.errors import BadImageError, ConfigError, DataError


# --- shapes ---------------------------------------------------------------------------

def test_shapes_source_is_deterministic():
  src = shapes.ShapesSource(seed=3, image_size=32)
  a, b = src[7], shapes.ShapesSource(seed=3, image_size=32)[7]
  assert a["image"].dtype == np.uint8 and a["image"].shape == (32, 32, 3)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["caption"] == b["caption"]
  assert not np.array_equal(src[8]["image"], a["image"])
  assert not np.array_equal(shapes.ShapesSource(seed=4, image_size=32)[7]["image"], a["image"])


def test_held_out_combos_leave_every_colour_and_shape_seen():
  held = shapes.held_out_combos(0, 0.2)
  assert held == shapes.held_out_combos(0, 0.2) != shapes.held_out_combos(1, 0.2)
  assert len(held) == round(0.2 * len(shapes.COLOUR_NAMES) * len(shapes.SHAPES))
  seen = {(c, s) for c in shapes.COLOUR_NAMES for s in shapes.SHAPES} - held
  assert {c for c, _ in seen} == set(shapes.COLOUR_NAMES)
  assert {s for _, s in seen} == set(shapes.SHAPES)
  with pytest.raises(ConfigError, match="data.held_out_fraction"):
    shapes.held_out_combos(0, 0.9)


def test_training_captions_avoid_held_out_and_rarely_repeat():
  src = shapes.ShapesSource(seed=0)
  captions = [src[i]["caption"] for i in range(1024)]
  held = [f"{c} {s}" for c, s in shapes.held_out_combos(0, 0.2)]
  assert not [c for c in captions if any(h in c for h in held)]
  rates = [shapes.duplicate_rate(captions[i:i + 128]) for i in range(0, 1024, 128)]
  assert max(rates) < 0.05, rates
  for n_objects in (1, 2, 3):  # Multi-object captions name every object.
    assert any(sum(s in c for s in shapes.SHAPES) >= n_objects for c in captions)


def test_zeroshot_set():
  zs = shapes.zeroshot_set(seed=0, image_size=32, per_class=2, held_out_fraction=0.2)
  n_classes = len(shapes.COLOUR_NAMES) * len(shapes.SHAPES)
  assert zs["images"].shape == (2 * n_classes, 32, 32, 3) and zs["images"].dtype == np.uint8
  assert zs["labels"].tolist() == sorted(list(range(n_classes)) * 2)
  assert zs["class_names"][0] == "red circle" and len(zs["class_names"]) == n_classes
  held = shapes.held_out_combos(0, 0.2)
  assert zs["seen"].sum() == n_classes - len(held)
  assert not zs["seen"][zs["class_names"].index(" ".join(sorted(held)[0]))]
  np.testing.assert_array_equal(zs["images"], shapes.zeroshot_set(0, 32, 2, 0.2)["images"])


def test_retrieval_and_binding_sets():
  ret = shapes.retrieval_set(seed=0, image_size=32, n=16)
  assert ret["images"].shape == (16, 32, 32, 3) and len(ret["captions"]) == 16
  train = shapes.ShapesSource(seed=0, image_size=32)
  assert ret["captions"] != [train[i]["caption"] for i in range(16)]
  bind = shapes.binding_set(seed=0, image_size=32, n=8)
  assert bind["images"].shape == (8, 32, 32, 3)
  for true, swapped in zip(bind["true_captions"], bind["swapped_captions"]):
    (c1, s1), (c2, s2) = (p.split() for p in true[2:].split(" and a "))
    assert c1 != c2 and s1 != s2
    assert swapped == f"a {c2} {s1} and a {c1} {s2}"


# --- image files ------------------------------------------------------------------------

def _write_images(d):
  """Good and bad image files; returns (good names, bad names)."""
  d.mkdir(parents=True, exist_ok=True)
  rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8)
  Image.fromarray(rgb).save(d / "good.jpg")
  Image.fromarray(rgb).save(d / "good.png")
  Image.fromarray(rgb[..., 0]).save(d / "gray.png")
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[:8, :, 0] = rgba[:8, :, 3] = 255  # Top half opaque red, bottom transparent.
  Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
  Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
  Image.fromarray(rgb).convert("P").save(d / "palette.gif")
  Image.fromarray(rgb[:1, :1]).save(d / "tiny.png")
  (d / "truncated.jpg").write_bytes((d / "good.jpg").read_bytes()[:200])
  (d / "text.jpg").write_bytes(b"this is not an image")
  return (["good.jpg", "good.png", "gray.png", "rgba.png", "cmyk.jpg", "palette.gif"],
          ["tiny.png", "truncated.jpg", "text.jpg", "missing.jpg"])


def test_load_image_modes_and_failures(tmp_path, monkeypatch):
  good, bad = _write_images(tmp_path)
  for name in good:
    image = folder.load_image(tmp_path / name)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
  rgba = folder.load_image(tmp_path / "rgba.png")
  assert rgba[0, 0].tolist() == [255, 0, 0] and rgba[-1, -1].tolist() == [255, 255, 255]
  reasons = dict(zip(bad, ["smaller than MIN_SIDE", "cannot decode", "cannot decode", "not found"]))
  for name, reason in reasons.items():
    with pytest.raises(BadImageError, match=reason) as e:
      folder.load_image(tmp_path / name)
    assert name in str(e.value)
  monkeypatch.setattr(folder, "MAX_PIXELS", 100)
  with pytest.raises(BadImageError, match="exceeds MAX_PIXELS"):
    folder.load_image(tmp_path / "good.png")


def _write_captions(tmp_path, names):
  lines = [json.dumps(dict(image=f"imgs/{n}", caption=f"picture {n}")) for n in names]
  path = tmp_path / "captions.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


def test_caption_folder_source_skip_and_raise(tmp_path):
  good, bad = _write_images(tmp_path / "imgs")
  path = _write_captions(tmp_path, good + bad)
  src = folder.CaptionFolderSource(path, on_bad_image="skip")
  assert len(src) == len(good) + len(bad)
  records = [src[i] for i in range(len(src))]
  assert sum(r is None for r in records) == len(bad)
  assert records[0]["caption"] == "picture good.jpg" and records[0]["image"].shape == (20, 30, 3)
  strict = folder.CaptionFolderSource(path, on_bad_image="raise")
  with pytest.raises(BadImageError, match="tiny.png"):
    strict[len(good)]
  with pytest.raises(ConfigError, match="data.on_bad_image"):
    folder.CaptionFolderSource(path, on_bad_image="ignore")


def test_caption_csv_and_malformed_files(tmp_path):
  _write_images(tmp_path)
  csv_path = tmp_path / "c.csv"
  csv_path.write_text('filepath,title\ngood.png,"a, quoted caption"\ngray.png,grey\n')
  src = folder.CaptionFolderSource(csv_path)
  assert src.captions == ["a, quoted caption", "grey"] and src[1]["image"].shape == (20, 30, 3)
  cases = {
      "bad.jsonl": ('{"image": "a.png", "caption": "x"}\n\n{"image": "b.png"\n', "bad.jsonl:3"),
      "keys.jsonl": ('{"image": "a.png", "text": "x"}\n', "keys.jsonl:1"),
      "cols.csv": ("path,text\na.png,x\n", "cols.csv:1"),
      "row.csv": ("image,caption\na.png,x\nb.png\n", "row.csv:3"),
      "empty.jsonl": ("", "no records"),
      "surrogate.jsonl": ('{"image": "a.png", "caption": "x \\ud800"}\n',
                          r"surrogate.jsonl:1: caption 'x \\ud800': not valid Unicode"),
  }
  for name, (text, match) in cases.items():
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=match):
      folder.CaptionFolderSource(tmp_path / name)
  with pytest.raises(DataError, match="nope.jsonl"):
    folder.CaptionFolderSource(tmp_path / "nope.jsonl")


def test_caption_csv_with_named_columns_and_separator(tmp_path):
  _write_images(tmp_path)
  path = tmp_path / "c.csv"
  path.write_text("url;alt;width\ngood.png;a cat, sitting;30\ngray.png;grey;30\n")
  src = folder.CaptionFolderSource(path, csv_image_key="url", csv_caption_key="alt", csv_separator=";")
  assert src.captions == ["a cat, sitting", "grey"] and src[0]["image"].shape == (20, 30, 3)
  with pytest.raises(DataError, match="csv_separator"):  # The default "," cannot split this header.
    folder.CaptionFolderSource(path, csv_image_key="url", csv_caption_key="alt")
  with pytest.raises(ConfigError, match="csv_caption_key"):
    folder.CaptionFolderSource(path, csv_image_key="url")
  tsv = tmp_path / "c.tsv"
  tsv.write_text("image\tcaption\ngood.png\tx, y\n")
  assert folder.CaptionFolderSource(tsv).captions == ["x, y"]
  data = base_config().data
  data.update(source="folder", captions=str(path), csv_image_key="url", csv_caption_key="alt", csv_separator=";")
  assert pipeline.make_source(data).captions == ["a cat, sitting", "grey"]


def test_image_folder_source(tmp_path):
  _write_images(tmp_path / "cats")
  _write_images(tmp_path / "dogs")
  (tmp_path / "dogs" / "README.txt").write_text("not data")
  src = folder.ImageFolderSource(tmp_path)
  assert src.class_names == ["cats", "dogs"] and len(src) == 18
  records = [src[i] for i in range(len(src))]
  assert sum(r is None for r in records) == 6
  assert {r["label"] for r in records if r} == {0, 1}
  with pytest.raises(DataError, match="class subdirectories"):
    folder.ImageFolderSource(tmp_path / "cats")


# --- loader -----------------------------------------------------------------------------

def _shapes_loader(**kw):
  return pipeline.Loader(shapes.ShapesSource(seed=0, image_size=32),
                              tokenizer=default_shapes_tokenizer(), image_size=32, max_len=16,
                              global_batch_size=8, seed=1, **kw)


def test_shapes_loader_batches():
  batch = next(iter(_shapes_loader()))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert -1 <= batch["image"].min() < batch["image"].max() <= 1
  assert batch["text"].shape == (8, 16) and batch["text"].dtype == np.int32
  assert batch[pipeline.SKIPPED].shape == (0, 2)


def _coordinate_image(h: int, w: int) -> np.ndarray:
  """Red = row, green = column: a crop shows which region it took."""
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)


def test_random_resized_crop_takes_a_region_of_the_stated_area_and_aspect():
  image = _coordinate_image(128, 128)
  crop = transforms.RandomResizedCrop(64, scale=(0.25, 0.25), ratio=(1.0, 1.0))
  corners = set()
  for seed in range(8):
    out = crop.random_map({"image": image}, np.random.default_rng(seed))["image"]
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    rows, cols = out[..., 0].astype(int), out[..., 1].astype(int)
    # A 64 x 64 region (a quarter of the area, square), upsampled 1x: bilinear keeps the coordinates.
    assert rows.max() - rows.min() == cols.max() - cols.min() == 63
    np.testing.assert_array_equal(rows, rows[:, :1] + 0 * rows)  # Rows stay rows: no flip, no rotation.
    corners.add((rows.min(), cols.min()))
  assert len(corners) == 8  # Each draw crops somewhere else.
  # Everything (scale 1, square image, square aspect) is the plain resize of evaluation.
  full = transforms.RandomResizedCrop(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
  np.testing.assert_array_equal(full.random_map({"image": image}, np.random.default_rng(0))["image"],
                                transforms.ResizeImage(32).map({"image": image})["image"])


def test_flip_mirrors_half_the_time_and_jitter_stays_in_range():
  image = _coordinate_image(16, 20)
  outs = [transforms.RandomFlip().random_map({"image": image}, np.random.default_rng(s))["image"] for s in range(40)]
  flipped = [np.array_equal(o, image[:, ::-1]) for o in outs]
  assert all(f or np.array_equal(o, image) for f, o in zip(flipped, outs)) and 10 <= sum(flipped) <= 30
  rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
  same = transforms.ColourJitter(0.0).random_map({"image": rgb}, np.random.default_rng(0))["image"]
  np.testing.assert_array_equal(same, rgb)
  jittered = [transforms.ColourJitter(0.4).random_map({"image": rgb}, np.random.default_rng(s))["image"]
              for s in range(4)]
  assert all(j.dtype == np.uint8 and not np.array_equal(j, rgb) for j in jittered)
  # Brightness alone scales the mean (contrast and saturation keep it): within [0.6, 1.4] of it, up to clipping.
  assert all(0.5 * rgb.mean() < j.mean() < 1.5 * rgb.mean() for j in jittered)


def test_user_data_is_augmented_by_seed_and_position_and_shapes_never(tmp_path):
  images = tmp_path / "imgs"
  images.mkdir()
  for i in range(8):
    Image.fromarray(_coordinate_image(40, 48) + i).save(images / f"{i}.png")
  captions = _write_captions(tmp_path, [f"{i}.png" for i in range(8)])
  data = base_config().data
  data.update(source="folder", captions=str(captions), image_size=24)
  data.augment.update(flip=True, colour_jitter=0.2)
  assert pipeline.augmentation(base_config().data) is None  # The shapes scenes.
  augment = pipeline.augmentation(data)
  assert [type(op) for op in augment] == [transforms.RandomResizedCrop, transforms.RandomFlip, transforms.ColourJitter]

  def loader(**kw):
    return pipeline.Loader(pipeline.make_source(data), tokenizer=None, image_size=24, max_len=0,
                           global_batch_size=4, seed=3, **kw)

  plain = next(iter(loader()))["image"]
  first, second = (b["image"] for b, _ in zip(loader(augment=augment), range(2)))
  again = next(iter(loader(augment=augment)))["image"]
  resumed = loader(augment=augment).make_iterator(start_batch=1)
  np.testing.assert_array_equal(first, again)  # The same seed augments the same way,
  np.testing.assert_array_equal(next(resumed)["image"], second)  # and a resumed run as the first did.
  assert not np.array_equal(first, plain) and first.shape == plain.shape == (4, 24, 24, 3)


def _bad_folder(tmp_path):
  """A caption folder of 10 records, 4 of them unreadable; returns (source, good names, bad names)."""
  good, bad = _write_images(tmp_path / "imgs")
  names = [n for pair in zip(good, bad) for n in pair] + good[len(bad):]
  return folder.CaptionFolderSource(_write_captions(tmp_path, names)), good, bad


def test_finite_loader_reads_every_readable_record_once_and_names_the_rest(tmp_path):
  src, good, bad = _bad_folder(tmp_path)
  tok = default_shapes_tokenizer()
  loader = pipeline.Loader(src, tokenizer=tok, image_size=24, max_len=32, global_batch_size=4, seed=0,
                           num_epochs=1, drop_remainder=False)
  batches = list(loader)
  texts = [tuple(t) for b in batches for t, v in zip(b["text"].tolist(), b[pipeline.VALID]) if v]
  assert sorted(texts) == sorted(tuple(tok.encode(f"picture {n}", 32).tolist()) for n in good)
  # Full batches: each unreadable record's row holds a readable stand-in, marked invalid.
  assert [len(b["image"]) for b in batches] == [4, 4, 4]
  assert sum(int((~b[pipeline.VALID]).sum()) for b in batches) == 12 - len(good)
  skipped = np.concatenate([b[pipeline.SKIPPED] for b in batches]).tolist()
  assert sorted(path for path, _ in skipped) == sorted(str(tmp_path / "imgs" / n) for n in bad)
  reasons = dict(zip(bad, ["smaller than MIN_SIDE", "cannot decode", "cannot decode", "not found"]))
  for path, reason in skipped:
    assert reasons[os.path.basename(path)] in reason and path in reason


def test_unreadable_records_get_the_same_stand_ins_on_any_process_count(tmp_path, monkeypatch):
  """2 processes read the rows of 1, unreadable records included: a bad record's stand-in is the
  same on every process, and each process names the bad files in its own rows."""
  src, good, bad = _bad_folder(tmp_path)
  tok = default_shapes_tokenizer()
  kw = dict(tokenizer=tok, image_size=24, max_len=32, global_batch_size=4, seed=0)
  it = iter(pipeline.Loader(src, **kw))
  whole = [next(it) for _ in range(6)]  # 2.4 epochs.
  parts = []
  for p in range(2):
    _as_process(monkeypatch, p, 2)
    it = iter(pipeline.Loader(src, **kw))
    parts.append([next(it) for _ in range(6)])
  readable = {tuple(tok.encode(f"picture {n}", 32).tolist()) for n in good}
  for k in range(6):
    for key in ("image", "text"):
      np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[k][key])
    assert set(map(tuple, whole[k]["text"].tolist())) <= readable
    both = sorted(map(tuple, np.concatenate([parts[0][k][pipeline.SKIPPED], parts[1][k][pipeline.SKIPPED]])))
    assert both == sorted(map(tuple, whole[k][pipeline.SKIPPED]))
  met = {path for b in whole for path, _ in b[pipeline.SKIPPED].tolist()}
  assert met == {str(tmp_path / "imgs" / n) for n in bad}


def test_a_source_without_a_readable_image_stops_with_a_data_error(tmp_path):
  _, bad = _write_images(tmp_path / "imgs")
  src = folder.CaptionFolderSource(_write_captions(tmp_path, bad))
  loader = pipeline.Loader(src, tokenizer=None, image_size=8, max_len=0, global_batch_size=2, seed=0)
  with pytest.raises(DataError, match=r"no readable image among its 4 records.*check the image files"):
    next(iter(loader))


def test_skipped_images_counts_distinct_files_and_lists_them_once(tmp_path, caplog):
  batches = [[("a.jpg", "a.jpg: cannot decode"), ("b.png", "b.png: file not found")],
             [("a.jpg", "a.jpg: cannot decode")], [], [("c.gif", "c.gif: 1x1 image")], [("b.png", "b.png: file not found")]]
  skipped = pipeline.SkippedImages(str(tmp_path), resume=False)
  counts = []
  for k, batch in enumerate(batches):
    skipped.add(np.array(batch, str).reshape(-1, 2))
    if k % 2 == 0:
      counts.append(skipped.gather())
  assert counts == [2, 2, 3]
  lines = [json.loads(line) for line in (tmp_path / "skipped.jsonl").read_text().splitlines()]
  assert lines == [{"path": "a.jpg", "reason": "a.jpg: cannot decode"},
                   {"path": "b.png", "reason": "b.png: file not found"},
                   {"path": "c.gif", "reason": "c.gif: 1x1 image"}]
  assert [m for m in caplog.messages if "skipped unreadable image" in m] == [
      f"skipped unreadable image {r['path']}: {r['reason']}" for r in lines]
  # A resumed run goes on from the file; a fresh run in the same directory starts it again.
  resumed = pipeline.SkippedImages(str(tmp_path), resume=True)
  resumed.add(np.array([("a.jpg", "a.jpg: cannot decode"), ("d.png", "d.png: cannot decode")]))
  assert resumed.gather() == 4 and len((tmp_path / "skipped.jsonl").read_text().splitlines()) == 4
  assert pipeline.SkippedImages(str(tmp_path), resume=False).gather() == 0
  assert (tmp_path / "skipped.jsonl").read_text() == ""


def test_loader_state_restores_exact_batches():
  it = iter(_shapes_loader())
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  fresh = iter(_shapes_loader())
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_loader_state_through_orbax(tmp_path):
  it = iter(_shapes_loader())
  next(it)
  state = {"step": np.zeros((), np.int32)}
  ckpt = Checkpointer(str(tmp_path), keep=1)
  ckpt.save(1, state, it)
  ckpt.wait()
  expected = next(it)
  fresh = iter(_shapes_loader())
  ckpt.restore(1, jax.eval_shape(lambda: state), fresh)
  ckpt.close()
  np.testing.assert_array_equal(next(fresh)["text"], expected["text"])


def test_loader_checks_batch_divides_processes(monkeypatch):
  monkeypatch.setattr(pipeline.jax, "process_count", lambda: 3)
  with pytest.raises(ConfigError, match="data.batch_size"):
    _shapes_loader()


def test_make_source(tmp_path):
  src = pipeline.make_source(dict(source="shapes", seed=2, image_size=16, held_out_fraction=0.1))
  assert isinstance(src, shapes.ShapesSource) and src[0]["image"].shape == (16, 16, 3)
  captions = _write_captions(tmp_path, ["a.png"])
  src = pipeline.make_source(dict(source="folder", captions=str(captions), on_bad_image="raise"))
  assert isinstance(src, folder.CaptionFolderSource) and src.on_bad_image == "raise"
  with pytest.raises(ConfigError, match="data.captions"):
    pipeline.make_source(dict(source="folder"))
  with pytest.raises(ConfigError, match="data.source"):
    pipeline.make_source(dict(source="tfrecord"))
  with pytest.raises(ConfigError, match="data.shards"):
    pipeline.make_source(dict(source="webdataset"))
  with pytest.raises(ConfigError, match="data.rag: needs task='generative'"):
    pipeline.make_source(dict(source="shapes_vqa", rag=dict(k=2, records=4)))


def test_twins_differ_only_in_shapes_and_share_a_batch():
  src = shapes.ShapesSource(seed=0, image_size=32, twins=True)
  held = shapes.held_out_combos(0, 0.2)
  shape_words = re.compile(r"\b(" + "|".join(shapes.SHAPES) + r")\b")
  strip = lambda caption: shape_words.sub("_", caption)
  for i in range(50):
    a, b = src[i]
    assert a["caption"] != b["caption"] and strip(a["caption"]) == strip(b["caption"])
    assert not np.array_equal(a["image"], b["image"])
    for caption in (a["caption"], b["caption"]):
      assert not any(f"{c} {s}" in caption for c, s in held)
  tok = default_shapes_tokenizer()
  loader = pipeline.Loader(src, tokenizer=tok, image_size=32, max_len=32, global_batch_size=8, seed=1)
  batch = next(iter(loader))
  captions = tok.decode(batch["text"])
  for k in range(0, 8, 2):
    assert strip(captions[k]) == strip(captions[k + 1]) and captions[k] != captions[k + 1]
  with pytest.raises(ConfigError, match=r"group size \(2\)"):
    pipeline.Loader(src, tokenizer=tok, image_size=32, max_len=32, global_batch_size=7, seed=1)


class _Indexed:
  """A random-access source whose record i carries label i (to count records exactly)."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return dict(image=np.full((8, 8, 3), i % 256, np.uint8), label=i)


def _as_process(monkeypatch, index, count):
  monkeypatch.setattr(pipeline.jax, "process_index", lambda: index)
  monkeypatch.setattr(pipeline.jax, "process_count", lambda: count)


def test_process_slices_form_the_single_process_batches(monkeypatch):
  src = shapes.ShapesSource(seed=0, image_size=16, twins=True)
  kw = dict(tokenizer=default_shapes_tokenizer(), image_size=16, max_len=16, global_batch_size=8, seed=3)
  it = iter(pipeline.Loader(src, **kw))
  whole = [next(it) for _ in range(3)]
  parts = []
  for p in range(2):
    _as_process(monkeypatch, p, 2)
    it = iter(pipeline.Loader(src, **kw))
    parts.append([next(it) for _ in range(3)])
  for k in range(3):
    for key in ("image", "text"):
      np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[k][key])
  # A run restored on another process count continues at the global batch of its step.
  _as_process(monkeypatch, 1, 2)
  later = next(pipeline.Loader(src, **kw).make_iterator(start_batch=2))
  np.testing.assert_array_equal(later["text"], whole[2]["text"][4:])


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_finite_loader_sees_every_record_once_per_epoch(monkeypatch, processes):
  src = _Indexed(23)
  labels = []
  for p in range(processes):
    _as_process(monkeypatch, p, processes)
    loader = pipeline.Loader(src, tokenizer=None, image_size=8, max_len=0, global_batch_size=6, seed=5,
                             num_epochs=2, drop_remainder=False)
    for batch in loader:
      assert len(batch["label"]) == 6 // processes
      labels.extend(batch["label"][batch[pipeline.VALID]].tolist())
  counts = np.bincount(labels, minlength=23)
  np.testing.assert_array_equal(counts, np.full(23, 2))
