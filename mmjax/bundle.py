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

import functools
import json
import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from PIL import Image

from mmjax import models, parallel
from mmjax.adapt import wrap as adapt
from mmjax.data.folder import to_rgb
from mmjax.data.tokenizer import load_saved_tokenizer
from mmjax.errors import CheckpointError, ConfigError
from mmjax.evals import benchmarks, in_chunks

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


class _Triple(NamedTuple):
  model: Any
  params: Any
  tokenizer: Any


class LoadedModel(_Triple):
  """What `load` returns: `model, params, tokenizer = mmjax.load(path)`, and for a two-tower model
  what a notebook needs besides, so that it needs nothing else (as open_clip's
  `create_model_and_transforms`):

    image_size, max_len       the model's input sizes
    preprocess(images)        PIL images or uint8 [H, W, 3] arrays of any size (one or a list) -> the
                              model's float32 [N, S, S, 3] input, exactly as training prepares files
                              (a NaFlex tower's: dict(patches, grid) at the recorded patch budget)
    encode_image(images)      unit-norm embeddings [N, D] of images (raw, or already preprocessed)
    encode_text(texts)        unit-norm embeddings [N, D] of a string or a list of them
    embedder(mesh)            the same encoders for `mmjax.evals.benchmarks`, over every device and process
  """

  def __new__(cls, model, params, tokenizer, model_config: dict, path: str = ""):
    loaded = super().__new__(cls, model, params, tokenizer)
    loaded.model_config, loaded.path = model_config, path
    return loaded

  @property
  def image_size(self) -> int:
    return int(self._two_tower()["image_size"])

  @property
  def max_len(self) -> int:
    return int(self._two_tower()["text"]["max_len"])

  def preprocess(self, images):
    single = isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3)
    prepare, _ = benchmarks.image_input(self._two_tower())
    out = []
    for i, image in enumerate([images] if single else images):
      array = to_rgb(image) if isinstance(image, Image.Image) else np.asarray(image)
      if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ConfigError(f"preprocess: image {i} is {array.dtype} {array.shape}; expected a PIL image or "
                          "uint8 [H, W, 3]")
      out.append(prepare(array))
    return jax.tree.map(lambda *rows: np.stack(rows), *out)

  def encode_image(self, images, batch_size: int = 256) -> np.ndarray:
    preprocessed = isinstance(images, dict) or (isinstance(images, np.ndarray) and images.ndim == 4
                                                and images.dtype == np.float32)
    x = images if preprocessed else self.preprocess(images)
    return in_chunks(functools.partial(self._encoders[0], self.params), (x,), batch_size)

  def encode_text(self, texts, batch_size: int = 256) -> np.ndarray:
    tokens = self.tokenizer.encode([texts] if isinstance(texts, str) else list(texts), self.max_len)
    return in_chunks(functools.partial(self._encoders[1], self.params), (tokens,), batch_size)

  def embedder(self, mesh=None, batch_size: int = 256, cache_dir: str | None = None) -> benchmarks.Embedder:
    """This model as a benchmark embeds with (`mmjax.evals.benchmarks`): `batch_size` rows at a time
    over `mesh` (default: every device, of every process), parameters replicated."""
    mesh = mesh if mesh is not None else parallel.make_mesh((("data", -1),))
    params = jax.device_put(self.params, parallel.replicated(mesh))
    replicated = dict(out_shardings=parallel.replicated(mesh))
    encode_image = jax.jit(lambda p, x: self.model.apply({"params": p}, image=x)[0], **replicated)
    encode_text = jax.jit(lambda p, t: self.model.apply({"params": p}, text=t)[1], **replicated)
    prepare, blank = benchmarks.image_input(self._two_tower())
    return benchmarks.Embedder(functools.partial(encode_image, params), functools.partial(encode_text, params),
                               lambda texts: self.tokenizer.encode(texts, self.max_len), prepare, blank, mesh,
                               batch_size, cache_dir, self.path)

  @functools.cached_property
  def _encoders(self):
    self._two_tower()
    return (jax.jit(lambda p, x: self.model.apply({"params": p}, image=x)[0]),
            jax.jit(lambda p, t: self.model.apply({"params": p}, text=t)[1]))

  def _two_tower(self) -> dict:
    if "kind" in self.model_config or "image_size" not in self.model_config:
      raise ConfigError(f"this export holds a {self.model_config.get('kind', 'model without image_size')!r}; "
                        "image_size, preprocess and the encoders need a two-tower export")
    return self.model_config


def load(path: str, base: str | None = None) -> LoadedModel:
  """`(model, params, tokenizer)`, with the preprocessing and encoders of `LoadedModel`, from an
  export directory. An adapter-only export needs `base`, the export of the model it adapts; its
  model config must match the adapter's."""
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
  return LoadedModel(adapt.wrap(models.build(model_config), adapt_config), params, tokenizer, model_config,
                     str(epath.Path(path).absolute()))
