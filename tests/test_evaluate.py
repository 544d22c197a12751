"""`python -m mmjax.evaluate --benchmark` on files in the formats users have (a Karpathy split JSON, an
ImageFolder train/test pair, a CSV/JSONL of labelled images), each metric against a NumPy reference
computed here from the same embeddings; resumable embedding caches; 2 processes x 4 devices against
1 x 8; and a recipe's benchmark entries run by training."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import mmjax
from mmjax.data import karpathy, shapes
from mmjax.errors import DataError
from mmjax.evals import recall
from mmjax.errors import ConfigError
from mmjax.evals import benchmarks
from mmjax.evaluate import benchmark
from tests.helpers import run_module, tiny_config, untrained_export

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
  result = benchmark("retrieval", str(tmp / "coco" / "dataset_coco.json"), export=export)
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
  with pytest.raises(ConfigError, match="--max_patches=16 sets a NaFlex image tower's patch budget"):
    benchmark("zeroshot_classification", str(tmp / "test"), export=str(export), max_patches=16)


def _numpy_zeroshot(loaded, image_paths, labels, names, templates):
  """top-1, top-5 and mean per-class recall in float64 from the export's own encoders."""
  zimg = np.asarray(loaded.encode_image([np.asarray(Image.open(p).convert("RGB")) for p in image_paths]), np.float64)
  prompts = np.asarray(loaded.encode_text([t.format(n) for n in names for t in templates]), np.float64)
  zclass = prompts.reshape(len(names), len(templates), -1).mean(axis=1)
  scores = zimg @ (zclass / np.linalg.norm(zclass, axis=1, keepdims=True)).T
  labels = np.asarray(labels)
  rank = np.array([(scores[i] > scores[i, labels[i]]).sum() for i in range(len(labels))])
  recall_per_class = [np.mean(rank[labels == c] == 0) for c in np.unique(labels)]
  return {"acc1": np.mean(rank == 0), "acc5": np.mean(rank < 5), "mean_per_class_recall": np.mean(recall_per_class)}


def test_zero_shot_on_a_folder_and_on_labelled_csv_and_jsonl_files(files):
  tmp, export = files
  loaded = mmjax.load(export)
  names, templates = ["crimson", "grass", "sky"], ["a {} square.", "the colour {}."]
  (tmp / "names.txt").write_text("# display names of the folders, sorted\n" + "\n".join(names) + "\n")
  (tmp / "templates.txt").write_text("\n".join(templates) + "\n")
  paths = [tmp / "test" / c / f"{i}.png" for c in sorted(COLOURS) for i in range(3)]
  labels = [k // 3 for k in range(9)]
  want = _numpy_zeroshot(loaded, paths, labels, names, templates)
  got = benchmark("zeroshot_classification", str(tmp / "test"), export=export, classes=str(tmp / "names.txt"),
                  templates=str(tmp / "templates.txt"), per_class=True)["metrics"]
  for key, value in want.items():
    assert got[key] == pytest.approx(value), key
  assert set(got["per_class_recall"]) == set(names)
  # The same images listed in a CSV by class name and in a JSONL by class index, in another order.
  rows = list(zip(paths, labels))[::-1]
  (tmp / "labels.csv").write_text("image,label\n" + "".join(f"{p.relative_to(tmp)},{names[y]}\n" for p, y in rows))
  (tmp / "labels.jsonl").write_text("".join(json.dumps({"image": str(p.relative_to(tmp)), "label": y}) + "\n"
                                            for p, y in rows))
  for listing in ("labels.csv", "labels.jsonl"):
    m = benchmark("zeroshot_classification", str(tmp / listing), export=export, classes=str(tmp / "names.txt"),
                  templates=templates)["metrics"]
    assert {k: m[k] for k in want} == pytest.approx(want) and m["images"] == 9
  with pytest.raises(DataError, match="labels.jsonl: labels are class indices; give the class names"):
    benchmark("zeroshot_classification", str(tmp / "labels.jsonl"), export=export)
  (tmp / "bad.csv").write_text("image,label\ntest/red/0.png,purple\n")
  with pytest.raises(DataError, match=r"bad.csv: record 1 has label 'purple', not one of the 3 classes"):
    benchmark("zeroshot_classification", str(tmp / "bad.csv"), export=export, classes=str(tmp / "names.txt"))


def test_shipped_imagenet_class_names_and_clip_templates():
  names = benchmarks.read_list("imagenet1k", benchmarks.CLASS_NAME_SETS, "classes")
  templates = benchmarks.read_list("clip_imagenet", benchmarks.TEMPLATE_SETS, "templates")
  # CLIP's names repeat two (missile, sunglasses) for distinct synsets; the count must stay 1000.
  assert len(names) == 1000 and len(set(names)) == 998 and names[0] == "tench" and names[-1] == "toilet paper"
  assert len(templates) == len(set(templates)) == 80 and all(t.count("{}") == 1 for t in templates)
  assert "a photo of a {}." in templates
  with pytest.raises(ConfigError, match="classes='imagenet': neither a shipped set"):
    benchmarks.read_list("imagenet", benchmarks.CLASS_NAME_SETS, "classes")


def test_a_killed_benchmark_resumes_from_its_embedding_cache(files, capsys):
  tmp, export = files
  cache = tmp / "cache"
  kw = dict(export=export, batch_size=8, cache_dir=str(cache), test_data=str(tmp / "test"))
  first = benchmark("linear_probe", str(tmp / "train"), **kw)["metrics"]
  batches = sorted((cache / "train_images").glob("*.npz"))
  assert [b.name for b in batches] == ["0000000000.npz", "0000000008.npz", "0000000016.npz"]  # 18 images, 8 a batch.
  batches[1].unlink()  # As if killed while embedding the second batch.
  capsys.readouterr()
  assert benchmark("linear_probe", str(tmp / "train"), **kw)["metrics"] == first
  printed = capsys.readouterr().out
  assert "embedded 18 train images in" in printed and "(10 from the cache)" in printed
  assert "embedded 9 test images in" in printed and "(9 from the cache)" in printed
  with pytest.raises(ConfigError, match=r"caches embeddings of \{'n': 18, 'batch_size': 8\}, not of this run's "
                                        r"\{'n': 18, 'batch_size': 16\}"):
    benchmark("linear_probe", str(tmp / "train"), **{**kw, "batch_size": 16})


def _evaluate_processes(cwd, processes: int, *args) -> None:
  """`python -m mmjax.evaluate` as `processes` processes sharing 8 CPU devices, joined by jax.distributed."""
  with __import__("socket").socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={8 // processes}"]))
  join = lambda i: ([f"--coordinator_address=localhost:{port}", f"--num_processes={processes}", f"--process_id={i}"]
                    if processes > 1 else [])
  procs = [subprocess.Popen([sys.executable, "-m", "mmjax.evaluate", *args, *join(i)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(processes)]
  for p in procs:
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_processes_of_four_devices_score_as_one_of_eight(files):
  """Each process reads its slice of every batch (here one unreadable image among them); the
  metrics and every cached embedding match one process's."""
  tmp, export = files
  shutil.copytree(tmp / "test", tmp / "mp")
  (tmp / "mp" / "green" / "broken.png").write_bytes(b"not an image")
  for processes in (1, 2):
    _evaluate_processes(tmp, processes, "--export", str(export), "--benchmark", "zeroshot_classification",
                        "--data", "mp", "--batch_size", "8", "--cache", f"cache{processes}", "--out",
                        f"mp{processes}.json")
  one, two = (json.load(open(tmp / f"mp{n}.json")) for n in (1, 2))
  assert one["metrics"] == two["metrics"] and one["metrics"]["images"] == 9 and one["metrics"]["skipped"] == 1
  for what in ("images", "class_prompts"):
    for batch in sorted((tmp / "cache1" / what).glob("*.npz")):
      a, b = np.load(batch), np.load(tmp / "cache2" / what / batch.name)
      np.testing.assert_allclose(a["z"], b["z"], atol=1e-6)
      np.testing.assert_array_equal(a["valid"], b["valid"])


def test_training_runs_a_recipes_benchmark_entries(files, tmp_path):
  """`evals.<name>.benchmark` entries run every eval_every steps, scored as NumPy scores the exported
  model's embeddings; an entry without data is skipped."""
  from mmjax import export, train
  tmp, _ = files
  config = tiny_config(total_steps=2, eval_every=2)
  config.evals = dict(batch_size=8, colours=dict(benchmark="zeroshot_classification", data=str(tmp / "test"),
                                                 classes="", templates="a photo of {}."),
                      unset=dict(benchmark="retrieval", data="", image_root="", split="test"))
  summary = train.train(config, str(tmp_path / "run"))
  loaded = mmjax.load(export.export(str(tmp_path / "run"), str(tmp_path / "export")))
  paths = [tmp / "test" / c / f"{i}.png" for c in sorted(COLOURS) for i in range(3)]
  want = _numpy_zeroshot(loaded, paths, [k // 3 for k in range(9)], sorted(COLOURS), ["a photo of {}."])
  for key, value in want.items():
    assert summary[f"colours/{key}"] == pytest.approx(value), key
  assert summary["colours/images"] == 9 and not any(k.startswith("unset/") for k in summary)
