"""Two-tower benchmarks on the files users have, with LAION CLIP_benchmark's definitions:

  zeroshot_classification   an ImageFolder tree, or a CSV/JSONL of image and label: top-1, top-5
                            and mean per-class recall of the nearest class-prompt embedding
  retrieval                 a Karpathy split JSON (COCO, Flickr30k): image->text and text->image
                            R@1/5/10, every caption of an image counted correct
  linear_probe              ImageFolder train/test trees: logistic regression on frozen features

Each runs on an `Embedder`: the model's jitted encoders and a mesh, so that `python -m
mmjax.evaluate --benchmark` on an export and a training run's periodic `evals.<name>` entries embed
the same way, over every device and process, resumably (`embed_rows`). A recipe's entry is

  c.evals.imagenet = dict(benchmark="zeroshot_classification", data="/data/imagenet/val",
                          classes="imagenet1k", templates="clip_imagenet")

with the benchmark's options beside `data`; training logs its metrics as `imagenet/acc1`, ... An
entry whose `data` is "" is skipped: a slot that `--config.evals.imagenet.data=...` fills.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mmjax import models
from mmjax.adapt import probe
from mmjax.data import folder, karpathy
from mmjax.data.transforms import NaFlexPatches, prepare_image
from mmjax.errors import ConfigError, DataError
from mmjax.evals import embed_rows, recall, zeroshot

BENCHMARKS = ("zeroshot_classification", "retrieval", "linear_probe")
# Shipped lists, by name: --classes imagenet1k, --template clip_imagenet (or a file of one a line).
CLASS_NAME_SETS = {"imagenet1k": "imagenet1k_classes.txt"}
TEMPLATE_SETS = {"clip_imagenet": "clip_imagenet_templates.txt"}
DEFAULT_TEMPLATES = ("a photo of a {}.",)
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def image_input(model_config: dict, max_patches: int | None = None) -> tuple[Callable[[np.ndarray], Any], Any]:
  """How a two-tower model takes one uint8 image [H, W, 3] of any size: `(prepare, blank)`, where
  `prepare(image)` is the model's input for it (float32 [S, S, 3] at the recorded `image_size`, or a
  NaFlex tower's dict(patches, grid) at `max_patches`, by default the recorded one) and `blank` one to
  stand in for an unreadable image."""
  if model_config["image"].get("naflex"):
    naflex = NaFlexPatches(models.resolve_tower(model_config, "image")["patch_size"],
                           max_patches or model_config["max_patches"])
    prepare = lambda image: naflex.map({"image": image})["image"]
  else:
    prepare = functools.partial(prepare_image, size=model_config["image_size"])
  return prepare, prepare(np.zeros((folder.MIN_SIDE, folder.MIN_SIDE, 3), np.uint8))


def at_patch_budget(embedder: "Embedder", model_config: dict, max_patches: int) -> "Embedder":
  """`embedder` with a NaFlex model's images cut into `max_patches` patches instead of the recorded
  budget; its cache (other embeddings) goes to `<cache>/max_patches_<N>`."""
  if not model_config["image"].get("naflex"):
    raise ConfigError(f"--max_patches={max_patches} sets a NaFlex image tower's patch budget; "
                      f"{embedder.model or 'the model'} has a fixed-resolution one (model.image.naflex is off)")
  prepare, blank = image_input(model_config, max_patches)
  cache_dir = os.path.join(embedder.cache_dir, f"max_patches_{max_patches}") if embedder.cache_dir else None
  return dataclasses.replace(embedder, prepare_image=prepare, blank_image=blank, cache_dir=cache_dir,
                             model=f"{embedder.model} at {max_patches} patches")


@dataclasses.dataclass
class Embedder:
  """What a benchmark embeds with: `encode_image` (a batch of `prepare_image` outputs -> [B, D]) and
  `encode_text` (int32 [B, L] -> [B, D]), jitted with replicated outputs; `tokenize` (list[str] ->
  int32 [N, L]); `prepare_image` and `blank_image` (`image_input`); `mesh` and `batch_size` (global
  rows per batch); `cache_dir` for resumable embeddings and `model` (a name that, with the data,
  keys the cache)."""
  encode_image: Callable
  encode_text: Callable
  tokenize: Callable
  prepare_image: Callable
  blank_image: Any
  mesh: Any
  batch_size: int
  cache_dir: str | None = None
  model: str = ""

  def images(self, read: Callable[[int], np.ndarray | None], n: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """`embed_rows` of uint8 images `read(i)` (None: unreadable, skipped), prepared as the model takes them."""

    def prepared(i):
      image = read(i)
      return None if image is None else self.prepare_image(image)

    return embed_rows(self.encode_image, prepared, n, self.mesh, self.batch_size, self.blank_image,
                      self.cache_dir, what)

  def texts(self, texts: Sequence[str], what: str) -> np.ndarray:
    tokens = self.tokenize(list(texts))
    return embed_rows(self.encode_text, lambda i: tokens[i], len(tokens), self.mesh, self.batch_size,
                      np.zeros_like(tokens[0]), self.cache_dir, what)[0]


def run(embedder: Embedder, name: str, data: str, **options) -> dict:
  """Benchmark `name` on `data`, as CLIP_benchmark lays out its results: {dataset, model, task, metrics}.
  `options` are the benchmark function's keyword arguments."""
  functions = {"zeroshot_classification": zeroshot_classification, "retrieval": retrieval,
               "linear_probe": linear_probe}
  if name not in functions:
    raise ConfigError(f"benchmark={name!r}: expected one of {BENCHMARKS}")
  metrics = functions[name](embedder, data, **options)
  return {"dataset": os.path.abspath(data), "model": embedder.model, "task": name, "metrics": metrics}


def zeroshot_classification(embedder: Embedder, data: str, classes: str | None = None,
                            templates: str | Sequence[str] | None = None, per_class: bool = False) -> dict:
  """`data`: an ImageFolder tree (`data/<class>/<image>`, classes in sorted folder order) or a CSV /
  JSONL file of `image` and `label` (a class name, or an index into `classes`). `classes`: a shipped
  set's name (`imagenet1k`) or a file of class names, one a line, replacing the folder names in
  their order; `templates`: prompts with "{}" for the name (a list, or one), a shipped set's name
  (`clip_imagenet`, CLIP's 80) or a file of them. With `per_class`, also each class's recall by name."""
  names = read_list(classes, CLASS_NAME_SETS, "classes") if classes else None
  source = folder.ImageFolderSource(data) if os.path.isdir(data) else folder.LabelledImageSource(data, names)
  names = names or source.class_names
  if len(names) != len(source.class_names):
    raise ConfigError(f"{len(names)} class names for the {len(source.class_names)} classes of {data}")
  if isinstance(templates, str):  # One template, a shipped set's name or a file of them.
    one = "{}" in templates and not os.path.isfile(templates)
    templates = (templates,) if one else read_list(templates, TEMPLATE_SETS, "templates")
  templates = tuple(templates or DEFAULT_TEMPLATES)
  bad = [t for t in templates if "{}" not in t]
  if bad:
    raise ConfigError(f"templates {bad} lack the {{}} that the class name replaces")
  zclass = zeroshot.class_embeddings(lambda prompts: embedder.texts(prompts, "class prompts"), names, templates)
  zimg, kept = embedder.images(_image_reader(source), len(source), "images")
  labels = np.asarray(source.labels)[kept]
  metrics = {**zeroshot.classification_metrics(zimg @ zclass.T, labels), "images": len(kept),
             "classes": len(names), "skipped": len(source) - len(kept)}
  if per_class:
    top1 = np.argmax(zimg @ zclass.T, axis=1) == labels
    metrics["per_class_recall"] = {names[c]: float(top1[labels == c].mean()) for c in np.unique(labels)}
  return metrics


def retrieval(embedder: Embedder, data: str, image_root: str | None = None, split: str = "test") -> dict:
  """`data`: a Karpathy split file; its `split` images under `image_root` (default: its directory).
  Every caption needs its image, so an unreadable one stops the benchmark, naming the file."""
  pairs = karpathy.read(data, image_root or None, split)
  zimg, _ = embedder.images(lambda i: folder.load_image(pairs.image_paths[i]), len(pairs.image_paths), "images")
  ztxt = embedder.texts(pairs.captions, "captions")
  return {**recall.evaluate_captions(zimg, ztxt, pairs.caption_image), "images": len(pairs.image_paths),
          "captions": len(pairs.captions)}


def linear_probe(embedder: Embedder, data: str, test_data: str | None = None) -> dict:
  """Logistic regression (L-BFGS, `mmjax.adapt.probe`) on the frozen image embeddings of the
  ImageFolder `data`; accuracy on the ImageFolder `test_data`, which holds the same class folders."""
  if not test_data:
    raise ConfigError("linear_probe needs test_data, an ImageFolder with the same class folders")
  train, test = folder.ImageFolderSource(data), folder.ImageFolderSource(test_data)
  if train.class_names != test.class_names:
    raise DataError(f"{data} and {test_data} hold different class folders")
  features = {}
  for split, source in (("train", train), ("test", test)):
    z, kept = embedder.images(_image_reader(source), len(source), f"{split} images")
    features[split] = z, np.asarray(source.labels)[kept]
  w, b = probe.logistic(*features["train"], len(train.class_names))
  x, y = features["test"]
  return {**zeroshot.classification_metrics(np.asarray(probe.predict(w, b, x)), y),
          "train_images": len(features["train"][1]), "test_images": len(y)}


def _image_reader(source) -> Callable[[int], np.ndarray | None]:
  """Image `i` of a skipping source, or None where it is unreadable."""
  return lambda i: (source[i] or {}).get("image")


def read_list(spec: str, shipped: dict[str, str], what: str) -> list[str]:
  """A shipped list by name, or a UTF-8 file of one item a line (blank lines and `#` comments skipped)."""
  if spec in shipped:
    text = (ASSETS / shipped[spec]).read_text(encoding="utf-8")
    where = f"the shipped {what} {spec!r}"
  else:
    try:
      with open(spec, encoding="utf-8") as f:
        text = f.read()
    except OSError as e:
      raise ConfigError(f"{what}={spec!r}: neither a shipped set {sorted(shipped)} nor a readable file ({e})") from e
    where = spec
  items = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
  if not items:
    raise DataError(f"{where}: no {what}")
  return items

