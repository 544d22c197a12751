"""Evals of a checkpoint, or a benchmark on your data with an export.

  python -m mmjax.evaluate --workdir DIR [--config RECIPE] [--step N]    # the recipe's evals
  python -m mmjax.evaluate --export DIR --benchmark zeroshot_classification --data IMAGE_FOLDER \
      [--classes names.txt] [--template "a photo of a {}."] [--out results.json]

Without --config the run's own `config.json` is used.
"""
from __future__ import annotations

import json
import os

from absl import flags
from ml_collections import config_flags

from mmjax import bundle, cli, runs, runtime
from mmjax.errors import ConfigError
from mmjax.evals import zeroshot
from mmjax.metrics import summary_table

def evaluate(config, workdir: str, step: int | None = None) -> dict:
  task, _, params, step = runs.restore_params(config, workdir, step)
  results = {**task.evaluate(params), "step": step}
  with open(os.path.join(workdir, f"eval_{step}.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  return results


BENCHMARKS = ("zeroshot_classification",)


def benchmark(export: str, name: str, data: str, classes: str | None = None, templates=None) -> dict:
  """`name` on `data` with an export, as CLIP_benchmark lays out its results: {dataset, model, task,
  metrics}. zeroshot_classification: `data` an ImageFolder tree, `classes` a file of class names (one a
  line, in sorted folder order; the folder names by default), `templates` the prompts ("{}" for the name)."""
  if name not in BENCHMARKS:
    raise ConfigError(f"--benchmark={name!r}: expected one of {BENCHMARKS}")
  names = None
  if classes:
    with open(classes, encoding="utf-8") as f:
      names = [line.strip() for line in f if line.strip()]
  loaded = bundle.load(export)
  metrics = zeroshot.classify_folder(loaded.encode_image, loaded.encode_text, data, names,
                                     tuple(templates or ("a photo of a {}.",)))
  return {"dataset": os.path.abspath(data), "model": os.path.abspath(export), "task": name, "metrics": metrics}


def main(argv):
  del argv
  runtime.quiet_logs()
  runtime.tune_cpu_runtime()
  f = flags.FLAGS
  if f.benchmark:
    if not (f.export and f.data):
      raise ConfigError("--benchmark needs --export (an export directory) and --data")
    result = benchmark(f.export, f.benchmark, f.data, f.classes, f.template)
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
  flags.DEFINE_string("data", None, "--benchmark: the dataset (zeroshot_classification: an ImageFolder tree).")
  flags.DEFINE_string("classes", None, "zeroshot_classification: a file of class names, one a line.")
  flags.DEFINE_multi_string("template", None, "zeroshot_classification: a prompt template with {} (repeatable).")
  flags.DEFINE_string("out", None, "--benchmark: also write the result as JSON here.")
  cli.run(main)
