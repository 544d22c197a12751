"""`python -m mmjax.evaluate --benchmark` on files in the formats users have (a Karpathy split JSON, an
ImageFolder train/test pair), each metric against a NumPy reference computed here from the same
embeddings."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import mmjax
from mmjax.data import karpathy, shapes
from mmjax.errors import DataError
from mmjax.evals import recall
from mmjax.evaluate import benchmark
from tests.helpers import run_module, untrained_export

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SENTENCES = sorted(set(shapes.retrieval_set(seed=0, image_size=40, n=64)["captions"]))[:20]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """An untrained export, a COCO-style Karpathy file (3 test images with 5 sentences each, one image
  in another split) and ImageFolder train/test trees of 3 classes."""
  tmp = tmp_path_factory.mktemp("bench")
  assert len(SENTENCES) == 20  # Distinct captions, which the tiny model's tokenizer tells apart: no ties.
  export = untrained_export(str(tmp / "export"))
  rng = np.random.default_rng(0)
  scenes = shapes.retrieval_set(seed=0, image_size=40, n=4)
  images = []
  for n, split in enumerate(["test", "train", "test", "test"]):
    os.makedirs(tmp / "coco" / "val2014", exist_ok=True)
    Image.fromarray(scenes["images"][n][: 30 + n]).save(tmp / "coco" / "val2014" / f"{n}.jpg")
    images.append({"filepath": "val2014", "filename": f"{n}.jpg", "split": split,
                   "sentences": [{"raw": SENTENCES[5 * n + k] + " ", "tokens": []} for k in range(5)]})
  (tmp / "coco" / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
  for split, count in (("train", 6), ("test", 3)):
    for name, colour in COLOURS.items():
      os.makedirs(tmp / split / name)
      for i in range(count):
        pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (24, 28, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp / split / name / f"{i}.png")
  return tmp, export


def test_karpathy_reader_keeps_the_split_and_every_sentence(files):
  tmp, _ = files
  pairs = karpathy.read(str(tmp / "coco" / "dataset_coco.json"))
  assert [os.path.basename(p) for p in pairs.image_paths] == ["0.jpg", "2.jpg", "3.jpg"]
  assert pairs.captions[5:7] == [SENTENCES[10], SENTENCES[11]] and len(pairs.captions) == 15  # Stripped.
  assert pairs.caption_image == [0] * 5 + [1] * 5 + [2] * 5
  assert len(karpathy.read(str(tmp / "coco" / "dataset_coco.json"), split="train").image_paths) == 1
  with pytest.raises(DataError, match=r"no image in split 'val'; its splits are \['test', 'train'\]"):
    karpathy.read(str(tmp / "coco" / "dataset_coco.json"), split="val")


def _numpy_recall(zimg, ztxt, owner, k):
  """Per image: is any own caption among the k best texts? Per text: is its image among the k best?"""
  sim = zimg @ ztxt.T
  i2t = [bool(set(np.argsort(-sim[i], kind="stable")[:k]) & {t for t, o in enumerate(owner) if o == i})
         for i in range(len(zimg))]
  t2i = [owner[t] in np.argsort(-sim[:, t], kind="stable")[:k] for t in range(len(ztxt))]
  return np.mean(i2t), np.mean(t2i)


def test_retrieval_counts_every_caption_of_an_image(files):
  tmp, export = files
  result = benchmark(export, "retrieval", str(tmp / "coco" / "dataset_coco.json"))
  loaded = mmjax.load(export)
  pairs = karpathy.read(str(tmp / "coco" / "dataset_coco.json"))
  zimg = loaded.encode_image([np.asarray(Image.open(p).convert("RGB")) for p in pairs.image_paths])
  ztxt = loaded.encode_text(pairs.captions)
  for k in (1, 5, 10):
    i2t, t2i = _numpy_recall(np.asarray(zimg, np.float64), np.asarray(ztxt, np.float64), pairs.caption_image, k)
    assert result["metrics"][f"i2t_r{k}"] == pytest.approx(i2t) and result["metrics"][f"t2i_r{k}"] == pytest.approx(t2i)
  assert result["metrics"]["images"] == 3 and result["metrics"]["captions"] == 15
  # One caption per image reduces to the paired recall.
  z = np.random.default_rng(1).normal(size=(6, 4))
  assert recall.evaluate_captions(z, z + 0.5, range(6)) == recall.evaluate(z, z + 0.5)


def test_linear_probe_and_zero_shot_from_the_command_line(files):
  tmp, export = files
  run_module("mmjax.evaluate", "--export", str(export), "--benchmark", "linear_probe", "--data", "train",
             "--test_data", "test", "--out", "probe.json", cwd=tmp)
  metrics = json.load(open(tmp / "probe.json"))["metrics"]
  # Three solid colours: a logistic probe on any image features separates them.
  assert metrics["acc1"] == 1.0 and metrics["train_images"] == 18 and metrics["test_images"] == 9
  run_module("mmjax.evaluate", "--export", str(export), "--benchmark", "zeroshot_classification", "--data", "test",
             "--out", "zs.json", cwd=tmp)
  result = json.load(open(tmp / "zs.json"))
  assert result["task"] == "zeroshot_classification" and result["metrics"]["images"] == 9
