"""Evals of a checkpoint, or a benchmark on your data with an export.

  python -m mmjax.evaluate --workdir DIR [--config RECIPE] [--step N]    # the recipe's evals
  python -m mmjax.evaluate --export DIR --benchmark zeroshot_classification --data IMAGE_FOLDER \
      [--classes names.txt] [--template "a photo of a {}."] [--out results.json]
  python -m mmjax.evaluate --export DIR --benchmark retrieval --data dataset_coco.json --image_root COCO_DIR
  python -m mmjax.evaluate --export DIR --benchmark linear_probe --data TRAIN_FOLDER --test_data TEST_FOLDER

Without --config the run's own `config.json` is used.
"""
from __future__ import annotations

import json
import os

import numpy as np
from absl import flags
from ml_collections import config_flags

from mmjax import bundle, cli, runs, runtime
from mmjax.adapt import probe
from mmjax.data import folder, karpathy
from mmjax.data.folder import load_image
from mmjax.errors import ConfigError, DataError
from mmjax.evals import embed_images, recall, zeroshot
from mmjax.metrics import summary_table


def evaluate(config, workdir: str, step: int | None = None) -> dict:
  task, _, params, step = runs.restore_params(config, workdir, step)
  results = {**task.evaluate(params), "step": step}
  with open(os.path.join(workdir, f"eval_{step}.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  return results


BENCHMARKS = ("zeroshot_classification", "retrieval", "linear_probe")


def benchmark(export: str, name: str, data: str, classes: str | None = None, templates=None,
              test_data: str | None = None, image_root: str | None = None, split: str = "test") -> dict:
  """`name` on `data` with an export, as CLIP_benchmark lays out its results: {dataset, model, task, metrics}.

  zeroshot_classification: `data` an ImageFolder tree, `classes` a file of class names (one a line,
    in sorted folder order; the folder names by default), `templates` the prompts ("{}" for the name).
  retrieval: `data` a Karpathy split file (COCO, Flickr30k), its `split` images under `image_root`;
    every caption of an image counts as correct.
  linear_probe: logistic regression (L-BFGS, `mmjax.adapt.probe`) on the frozen image embeddings of
    the ImageFolder `data`, accuracy on the ImageFolder `test_data` (the same class folders)."""
  if name not in BENCHMARKS:
    raise ConfigError(f"--benchmark={name!r}: expected one of {BENCHMARKS}")
  loaded = bundle.load(export)
  if name == "zeroshot_classification":
    names = None
    if classes:
      with open(classes, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    metrics = zeroshot.classify_folder(loaded.encode_image, loaded.encode_text, data, names,
                                       tuple(templates or ("a photo of a {}.",)))
  elif name == "retrieval":
    pairs = karpathy.read(data, image_root, split)
    # Every caption needs its image, so an unreadable one stops the benchmark naming the file.
    zimg, kept = embed_images(loaded.encode_image, lambda i: load_image(pairs.image_paths[i]), len(pairs.image_paths))
    metrics = {**recall.evaluate_captions(zimg, loaded.encode_text(pairs.captions), pairs.caption_image),
               "images": len(kept), "captions": len(pairs.captions)}
  else:
    if not test_data:
      raise ConfigError("--benchmark=linear_probe needs --test_data, an ImageFolder with the same class folders")
    train, test = (folder.ImageFolderSource(d) for d in (data, test_data))
    if train.class_names != test.class_names:
      raise DataError(f"{data} and {test_data} hold different class folders")
    features = {}
    for split_name, source in (("train", train), ("test", test)):
      z, kept = embed_images(loaded.encode_image, lambda i: (source[i] or {}).get("image"), len(source))
      features[split_name] = z, np.array([source.labels[i] for i in kept])
    w, b = probe.logistic(*features["train"], len(train.class_names))
    x, y = features["test"]
    metrics = {**zeroshot.classification_metrics(np.asarray(probe.predict(w, b, x)), y),
               "train_images": len(features["train"][1]), "test_images": len(y)}
  return {"dataset": os.path.abspath(data), "model": os.path.abspath(export), "task": name, "metrics": metrics}


def main(argv):
  del argv
  runtime.quiet_logs()
  runtime.tune_cpu_runtime()
  f = flags.FLAGS
  if f.benchmark:
    if not (f.export and f.data):
      raise ConfigError("--benchmark needs --export (an export directory) and --data")
    result = benchmark(f.export, f.benchmark, f.data, f.classes, f.template, f.test_data, f.image_root, f.split)
    print(summary_table(result["metrics"]))
    if f.out:
      with open(f.out, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=2)
    return
  if not f.workdir:
    raise ConfigError("give --workdir (a training run's own evals) or --export with --benchmark and --data")
  config = f.config or runs.load_run_config(f.workdir)
  print(summary_table(evaluate(config, f.workdir, f.step)))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Recipe; defaults to the workdir's config.json.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "The training run to evaluate (its recipe's evals).")
  flags.DEFINE_integer("step", None, "Checkpoint step; the latest by default.")
  flags.DEFINE_string("export", None, "--benchmark: the export directory to evaluate.")
  flags.DEFINE_enum("benchmark", None, BENCHMARKS, "A benchmark on --data instead of the recipe's evals.")
  flags.DEFINE_string("data", None, "--benchmark: the dataset (an ImageFolder tree; retrieval: a Karpathy JSON).")
  flags.DEFINE_string("classes", None, "zeroshot_classification: a file of class names, one a line.")
  flags.DEFINE_multi_string("template", None, "zeroshot_classification: a prompt template with {} (repeatable).")
  flags.DEFINE_string("test_data", None, "linear_probe: the ImageFolder to test on (--data is the training one).")
  flags.DEFINE_string("image_root", None, "retrieval: the images' root (default: the Karpathy file's directory).")
  flags.DEFINE_string("split", "test", "retrieval: the Karpathy split to evaluate.")
  flags.DEFINE_string("out", None, "--benchmark: also write the result as JSON here.")
  cli.run(main)
