"""Params-only exports: `python -m mmjax.export --workdir DIR --out DIR2`, and `mmjax.load(DIR2)`.

An export directory holds `params/` (an Orbax checkpoint of the parameters only),
`model_config.json` (the resolved `config.model`, vocabulary size and media token ids included),
`tokenizer.json` with the tokenizer's files (its kind, padding and cleaning rules) and
`export.json` (where it came from), so a notebook needs nothing else. `python -m
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
from mmjax.data.tokenizer import load_saved_tokenizer
from mmjax.errors import CheckpointError

MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer.json"
PARAMS = "params"


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


def export(workdir: str, out: str, step: int | None = None) -> str:
  from mmjax.train import load_run_config, restore_params
  task, _, params, step = restore_params(load_run_config(workdir), workdir, step)
  return write_export(out, task.model_config, params, task.tokenizer,
                      {"workdir": os.path.abspath(workdir), "step": step})


def load(path: str):
  """`(model, params, tokenizer)` from an export directory."""
  path = epath.Path(path).absolute()
  missing = [n for n in (PARAMS, MODEL_CONFIG, TOKENIZER) if not (path / n).exists()]
  if missing:
    raise CheckpointError(f"{path} is not an mmjax export: missing {missing}")
  model_config = json.loads((path / MODEL_CONFIG).read_text())
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(path / PARAMS)
  tokenizer = load_saved_tokenizer(str(path))
  if "kind" in model_config:  # A generative model: a decoder or a vision-language model.
    from mmjax.tasks.generative import build_model
    return build_model(model_config, tokenizer)[0], params, tokenizer
  return models.build(model_config), params, tokenizer


def main(argv):
  del argv
  from mmjax.train import quiet_logs
  quiet_logs()
  print(f"exported to {export(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.step)}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Training run to export.", required=True)
  flags.DEFINE_string("out", None, "Export directory to create.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step; the latest by default.")
  app.run(main)
