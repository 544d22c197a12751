"""`python -m mmjax.evaluate --workdir DIR [--config configs/x.py] [--step N]`: evals of a checkpoint.

Without --config the run's own `config.json` is used.
"""
from __future__ import annotations

import json
import os

from absl import flags
from ml_collections import config_flags

from mmjax import cli, runs, runtime
from mmjax.metrics import summary_table

def evaluate(config, workdir: str, step: int | None = None) -> dict:
  task, _, params, step = runs.restore_params(config, workdir, step)
  results = {**task.evaluate(params), "step": step}
  with open(os.path.join(workdir, f"eval_{step}.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  return results


def main(argv):
  del argv
  runtime.quiet_logs()
  runtime.tune_cpu_runtime()
  f = flags.FLAGS
  config = f.config or runs.load_run_config(f.workdir)
  print(summary_table(evaluate(config, f.workdir, f.step)))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Recipe; defaults to the workdir's config.json.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "The training run to evaluate.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step; the latest by default.")
  cli.run(main)
