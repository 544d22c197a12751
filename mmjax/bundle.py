"""The export directory: a trained or converted model that a notebook loads with nothing else.

It holds `params/` (an Orbax checkpoint of the parameters only), `model_config.json` (the
resolved model config, tokenizer ids and `kind` included: `mmjax.models.build` rebuilds the model
from it), `tokenizer.json` with the tokenizer's files (its kind, padding and cleaning rules; none for
image-only models) and
`export.json` (where it came from). `python -m mmjax.export` writes it from a training run and
`python -m mmjax.convert_checkpoint` from open_clip, HF and big_vision checkpoints; `mmjax.load` and the
retrieval index read it. An adapted model stores `{"base", "adapter"}` parameters, or the adapter
alone, which `load(path, base=<export of the base model>)` puts back on its base.
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from mmjax import models
from mmjax.adapt import wrap as adapt
from mmjax.data.tokenizer import load_saved_tokenizer
from mmjax.errors import CheckpointError

MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer.json"
PARAMS = "params"
ORIGIN = "export.json"
ADAPTER_ONLY = "adapter_only"


def is_bundle(path: str) -> bool:
  return os.path.exists(os.path.join(path, MODEL_CONFIG))


def write(out: str, model_config: dict, params, tokenizer, origin: dict) -> str:
  """Writes an export directory; `origin` (JSON) records where the parameters came from."""
  out = epath.Path(out).absolute()
  if (out / PARAMS).exists():
    raise CheckpointError(f"{out / PARAMS} exists already; choose an empty --out")
  out.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out / PARAMS, jax.device_get(params))
  if jax.process_index() == 0:
    (out / MODEL_CONFIG).write_text(json.dumps(model_config, indent=2))
    if tokenizer is not None:  # Image-only models (classifiers) have none.
      tokenizer.save(out)
    (out / ORIGIN).write_text(json.dumps(origin))
  return str(out)


def read(path: str):
  """`(model_config, params, tokenizer)` as stored, without building the model."""
  path = epath.Path(path).absolute()
  missing = [n for n in (PARAMS, MODEL_CONFIG) if not (path / n).exists()]
  if missing and (path / "config.json").exists():  # What `mmjax.train` writes in a workdir.
    raise CheckpointError(f"{path} is a training workdir, not an export: export it first with "
                          f"`python -m mmjax.export --workdir {path} --out {path}_export` and load that")
  if missing:
    raise CheckpointError(f"{path} is not an mmjax export: missing {missing}")
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(path / PARAMS)
  tokenizer = load_saved_tokenizer(str(path)) if (path / TOKENIZER).exists() else None
  return json.loads((path / MODEL_CONFIG).read_text()), params, tokenizer


def load(path: str, base: str | None = None):
  """`(model, params, tokenizer)` from an export directory. An adapter-only export needs `base`,
  the export of the model it adapts; its model config must match the adapter's."""
  model_config, params, tokenizer = read(path)
  adapt_config = model_config.pop("adapt", None)
  origin = epath.Path(path).absolute() / ORIGIN
  if origin.exists() and json.loads(origin.read_text()).get(ADAPTER_ONLY, False):
    if base is None:
      raise CheckpointError(f"{path} holds an adapter only: load it with base=<the export of its base model>")
    base_config, base_params, _ = read(base)
    if base_config != model_config:
      diff = sorted(k for k in base_config.keys() | model_config.keys() if base_config.get(k) != model_config.get(k))
      raise CheckpointError(f"the base export {base} has a different model config than {path} expects "
                            f"(keys {diff})")
    params = {adapt.BASE: base_params, adapt.ADAPTER: params}
  return adapt.wrap(models.build(model_config), adapt_config), params, tokenizer
