"""Evals of a checkpoint, or a benchmark on your data with an export or a training run.

  python -m mmjax.evaluate --workdir DIR [--config RECIPE] [--step N]    # the recipe's evals
  python -m mmjax.evaluate --export DIR --benchmark zeroshot_classification --data IMAGENET/val \
      --classes imagenet1k --template clip_imagenet [--out results.json] [--cache DIR]
  python -m mmjax.evaluate --export DIR --benchmark retrieval --data dataset_coco.json --image_root COCO_DIR
  python -m mmjax.evaluate --export DIR --benchmark linear_probe --data TRAIN_FOLDER --test_data TEST_FOLDER
  python -m mmjax.evaluate --export VLM_DIR --benchmark vqav2 --data v2_OpenEnded_mscoco_val2014_questions.json \
      --annotations v2_mscoco_val2014_annotations.json --image_root COCO/val2014 [--predictions answers.json]
  python -m mmjax.evaluate --export VLM_DIR --benchmark coco_captions --data captions_val2014.json --image_root COCO/val2014
  python -m mmjax.evaluate --export VLM_DIR --benchmark multiple_choice --data questions.jsonl

`--workdir DIR` instead of `--export` benchmarks a run's latest checkpoint. Without --config the run's
own `config.json` is used. Benchmarks embed `--batch_size` rows at a time over every device; with
`--coordinator_address/--num_processes/--process_id` (or on a pod or SLURM) over every process, each
reading its slice. `--cache DIR` keeps the embeddings, so a killed run resumes.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
from absl import flags
from ml_collections import config_flags

from mmjax import bundle, cli, runs, runtime
from mmjax.errors import ConfigError
from mmjax.evals import benchmarks, vlm_benchmarks
from mmjax.metrics import summary_table


def evaluate(config, workdir: str, step: int | None = None) -> dict:
  task, _, params, step = runs.restore_params(config, workdir, step)
  results = {**task.evaluate(params), "step": step}
  with open(os.path.join(workdir, f"eval_{step}.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  return results


BENCHMARKS = benchmarks.BENCHMARKS + vlm_benchmarks.BENCHMARKS


def benchmark(name: str, data: str, export: str | None = None, workdir: str | None = None, config=None,
              batch_size: int = 256, cache_dir: str | None = None, max_patches: int | None = None,
              **options) -> dict:
  """Benchmark `name` (`BENCHMARKS`) on `data` with an export, or with a training run's latest
  checkpoint (`workdir`, its recipe `config` by default), in CLIP_benchmark's layout: {dataset, model,
  task, metrics}, plus `predictions` for the vision-language benchmarks (the official results format).
  `max_patches`: a NaFlex two-tower model's patch budget per image instead of its recorded one.
  `options` go to the benchmark (`mmjax.evals.benchmarks.run`, `mmjax.evals.vlm_benchmarks.run`)."""
  if name not in BENCHMARKS:
    raise ConfigError(f"--benchmark={name!r}: expected one of {BENCHMARKS}")
  if bool(export) == bool(workdir):
    raise ConfigError("--benchmark needs one model: --export (an export directory) or --workdir (a training run)")
  if max_patches and name in vlm_benchmarks.BENCHMARKS:
    raise ConfigError(f"--max_patches sets a NaFlex two-tower model's patch budget; --benchmark={name} evaluates a "
                      "vision-language model")
  if workdir:
    config = config or runs.load_run_config(workdir)
    task, _, params, step = runs.restore_params(config, workdir)
    model_name = f"{os.path.abspath(workdir)}@{step}"
  else:
    loaded = bundle.load(export)
    model_name = loaded.path
  if name in vlm_benchmarks.BENCHMARKS:
    if workdir:
      loaded = bundle.LoadedModel(task.model, jax.device_get(params), task.tokenizer, task.model_config, model_name)
    result = vlm_benchmarks.run(loaded, name, data, batch_size=batch_size, **options)
    return {"dataset": os.path.abspath(data), "model": model_name, "task": name, "metrics": result.metrics,
            "predictions": result.predictions}
  if workdir:
    if not hasattr(task, "embedder"):
      raise ConfigError(f"--benchmark={name} needs a two-tower model; {workdir} trains task {config.task!r}")
    embedder = dataclasses.replace(task.embedder(params, cache_dir), batch_size=batch_size, model=model_name)
  else:
    embedder = loaded.embedder(batch_size=batch_size, cache_dir=cache_dir)
  if max_patches:
    embedder = benchmarks.at_patch_budget(embedder, task.model_config if workdir else loaded.model_config,
                                          max_patches)
  return benchmarks.run(embedder, name, data, **options)


def main(argv):
  del argv
  runtime.quiet_logs()
  runtime.tune_cpu_runtime()
  cli.join_processes()
  f = flags.FLAGS
  if f.benchmark:
    templates = f.template[0] if f.template and len(f.template) == 1 else f.template
    options = {"zeroshot_classification": dict(classes=f.classes, templates=templates, per_class=f.per_class),
               "retrieval": dict(image_root=f.image_root, split=f.split),
               "linear_probe": dict(test_data=f.test_data),
               "vqav2": dict(annotations=f.annotations, image_root=f.image_root, image_pattern=f.image_pattern),
               "coco_captions": dict(image_root=f.image_root, meteor=f.meteor),
               "multiple_choice": {}}[f.benchmark]
    if not f.data:
      raise ConfigError("--benchmark needs --data")
    result = benchmark(f.benchmark, f.data, f.export, f.workdir, f.config, f.batch_size, f.cache, f.max_patches,
                       **options)
    print(summary_table({k: v for k, v in result["metrics"].items() if not isinstance(v, dict)}))
    if jax.process_index() == 0:
      if f.predictions and "predictions" in result:
        with open(f.predictions, "w", encoding="utf-8") as out:
          json.dump(result["predictions"], out)
      if f.out:
        with open(f.out, "w", encoding="utf-8") as out:
          json.dump({k: v for k, v in result.items() if k != "predictions"}, out, indent=2)
    return
  if not f.workdir:
    raise ConfigError("give --workdir (a training run's own evals) or --benchmark with --data and a model")
  config = f.config or runs.load_run_config(f.workdir)
  print(summary_table(evaluate(config, f.workdir, f.step)))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Recipe; defaults to the workdir's config.json.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "The training run to evaluate (its recipe's evals, or --benchmark).")
  flags.DEFINE_integer("step", None, "Checkpoint step; the latest by default.")
  flags.DEFINE_string("export", None, "--benchmark: the export directory to evaluate.")
  flags.DEFINE_enum("benchmark", None, BENCHMARKS, "A benchmark on --data instead of the recipe's evals.")
  flags.DEFINE_string("data", None, "--benchmark: the dataset (an ImageFolder tree or a CSV/JSONL of image,label; "
                      "retrieval: a Karpathy JSON).")
  flags.DEFINE_string("classes", None, "zeroshot_classification: class names, one a line, or imagenet1k.")
  flags.DEFINE_multi_string("template", None, "zeroshot_classification: a prompt with {} (repeatable), a file "
                            "of them, or clip_imagenet (CLIP's 80).")
  flags.DEFINE_bool("per_class", False, "zeroshot_classification: also each class's recall.")
  flags.DEFINE_string("test_data", None, "linear_probe: the ImageFolder to test on (--data is the training one).")
  flags.DEFINE_string("image_root", None, "retrieval, vqav2, coco_captions: the images' root (default: the data "
                      "file's directory; vqav2 needs it).")
  flags.DEFINE_string("annotations", None, "vqav2: the annotations JSON (--data is the questions JSON).")
  flags.DEFINE_string("image_pattern", None, "vqav2: image file names under --image_root "
                      "(default COCO_{split}_{image_id:012d}.jpg, split from the questions file).")
  flags.DEFINE_bool("meteor", True, "coco_captions: also METEOR (pycocoevalcap's, when it and java are installed).")
  flags.DEFINE_string("predictions", None, "vqav2, coco_captions, multiple_choice: write the model's answers here, "
                      "in the official results format.")
  flags.DEFINE_string("split", "test", "retrieval: the Karpathy split to evaluate.")
  flags.DEFINE_integer("batch_size", 256, "--benchmark: global rows per batch, split over every device and process.")
  flags.DEFINE_string("cache", None, "--benchmark: keep embeddings here as they are made; a rerun resumes from them.")
  flags.DEFINE_string("out", None, "--benchmark: also write the result as JSON here.")
  flags.DEFINE_integer("max_patches", None, "--benchmark, NaFlex image towers: patches per image instead of the "
                       "model's recorded budget (evaluate at several budgets).")
  cli.define_process_flags()
  cli.run(main)
