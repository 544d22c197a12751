"""`python -m mmjax.export --workdir DIR --out DIR2`: a run's parameters as an export directory.

The directory's format is `mmjax.bundle`'s; `mmjax.load(DIR2)` reads it. An adapted run
(`config.adapt`) exports `{"base", "adapter"}` parameters, or with `--adapter_only` the adapter
alone, which `mmjax.load(DIR2, base=<export of the base run>)` puts back on its base.
"""
from __future__ import annotations

import os

from absl import flags

from mmjax import bundle, cli, runs, runtime
from mmjax.adapt import wrap as adapt
from mmjax.errors import CheckpointError


def export(workdir: str, out: str, step: int | None = None, adapter_only: bool = False) -> str:
  """Exports a run; `adapter_only` (adapted runs) writes the adapter's parameters alone, for
  `mmjax.load(out, base=<export of the base run>)`."""
  task, _, params, step = runs.restore_params(runs.load_run_config(workdir), workdir, step)
  origin = {"workdir": os.path.abspath(workdir), "step": step}
  if adapter_only:
    if "adapt" not in task.model_config:
      raise CheckpointError(f"--adapter_only: the run in {workdir} has no adapter (config.adapt.method is empty)")
    params, origin[bundle.ADAPTER_ONLY] = params[adapt.ADAPTER], True
  model_config, params = task.for_export(params)
  return bundle.write(out, model_config, params, task.tokenizer, origin)


def main(argv):
  del argv
  runtime.quiet_logs()
  f = flags.FLAGS
  print(f"exported to {export(f.workdir, f.out, f.step, f.adapter_only)}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Training run to export.", required=True)
  flags.DEFINE_string("out", None, "Export directory to create.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step; the latest by default.")
  flags.DEFINE_bool("adapter_only", False, "Adapted runs: export the adapter's parameters only.")
  cli.run(main)
