"""Params-only exports: `python -m mmjax.export --workdir DIR --out DIR2`, and `mmjax.load(DIR2)`.

An export directory holds `params/` (an Orbax checkpoint of the parameters only),
`model_config.json` (the resolved `config.model`, vocabulary size and media token ids included),
`tokenizer.json` with the tokenizer's files (its kind, padding and cleaning rules) and
`export.json` (where it came from), so a notebook needs nothing else. An adapted run
(`config.adapt`) exports `{"base", "adapter"}` parameters, or with `--adapter_only` the adapter
alone, which `mmjax.load(DIR2, base=<export of the base run>)` puts back on its base. `python -m
mmjax.convert` writes the same layout from open_clip, HF and big_vision checkpoints.
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from absl import app, flags
from etils import epath

from mmjax import models
from mmjax.adapt import wrap as adapt
from mmjax.data.tokenizer import load_saved_tokenizer
from mmjax.errors import CheckpointError

MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer.json"
PARAMS = "params"
ADAPTER_ONLY = "adapter_only"


def write_export(out: str, model_config: dict, params, tokenizer, origin: dict) -> str:
  """Writes an export directory; `origin` (JSON) records where the parameters came from."""
  out = epath.Path(out).absolute()
  if (out / PARAMS).exists():
    raise CheckpointError(f"{out / PARAMS} exists already; choose an empty --out")
  out.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out / PARAMS, jax.device_get(params))
  if jax.process_index() == 0:
    (out / MODEL_CONFIG).write_text(json.dumps(model_config, indent=2))
    tokenizer.save(out)
    (out / "export.json").write_text(json.dumps(origin))
  return str(out)


def export(workdir: str, out: str, step: int | None = None, adapter_only: bool = False) -> str:
  """Exports a run; `adapter_only` (adapted runs) writes the adapter's parameters alone, for
  `load(out, base=<export of the base run>)`."""
  from mmjax.train import load_run_config, restore_params
  task, _, params, step = restore_params(load_run_config(workdir), workdir, step)
  origin = {"workdir": os.path.abspath(workdir), "step": step}
  if adapter_only:
    if "adapt" not in task.model_config:
      raise CheckpointError(f"--adapter_only: the run in {workdir} has no adapter (config.adapt.method is empty)")
    params, origin[ADAPTER_ONLY] = params[adapt.ADAPTER], True
  return write_export(out, task.model_config, params, task.tokenizer, origin)


def _read(path: epath.Path):
  missing = [n for n in (PARAMS, MODEL_CONFIG, TOKENIZER) if not (path / n).exists()]
  if missing:
    raise CheckpointError(f"{path} is not an mmjax export: missing {missing}")
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(path / PARAMS)
  return json.loads((path / MODEL_CONFIG).read_text()), params, load_saved_tokenizer(str(path))


def load(path: str, base: str | None = None):
  """`(model, params, tokenizer)` from an export directory. An adapter-only export needs `base`,
  the export of the model it adapts; its model config must match the adapter's."""
  path = epath.Path(path).absolute()
  model_config, params, tokenizer = _read(path)
  adapt_config = model_config.pop("adapt", None)
  origin = path / "export.json"
  adapter_only = origin.exists() and json.loads(origin.read_text()).get(ADAPTER_ONLY, False)
  if adapter_only:
    if base is None:
      raise CheckpointError(f"{path} holds an adapter only: load it with base=<the export of its base model>")
    base_config, base_params, _ = _read(epath.Path(base).absolute())
    if base_config != model_config:
      diff = sorted(k for k in base_config.keys() | model_config.keys() if base_config.get(k) != model_config.get(k))
      raise CheckpointError(f"the base export {base} has a different model config than {path} expects "
                            f"(keys {diff})")
    params = {adapt.BASE: base_params, adapt.ADAPTER: params}
  if "kind" in model_config:  # A generative model: a decoder or a vision-language model.
    from mmjax.tasks.generative import build_model
    model = build_model(model_config, tokenizer)[0]
  else:
    model = models.build(model_config)
  return adapt.wrap(model, adapt_config), params, tokenizer


def main(argv):
  del argv
  from mmjax.train import quiet_logs
  quiet_logs()
  f = flags.FLAGS
  print(f"exported to {export(f.workdir, f.out, f.step, f.adapter_only)}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Training run to export.", required=True)
  flags.DEFINE_string("out", None, "Export directory to create.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step; the latest by default.")
  flags.DEFINE_bool("adapter_only", False, "Adapted runs: export the adapter's parameters only.")
  app.run(main)
