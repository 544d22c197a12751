"""Labelled classes for adaptation: the base / novel split, k-shot training records, test sets.

`data.source` is "shapes_classes" (the 48 colour x shape classes of `mmjax.data.shapes`,
training shots and test images from separate random streams) or "image_folder" (an
ImageFolder tree at `data.image_root`: k shots per base class drawn from its files, the
test set from the files left). Classes are split once by `data.split_seed`: a seeded
permutation, `data.base_fraction` of the classes are base (seen in adaptation), the rest
novel. `data.shot_seed` picks which k shots; repeats of an experiment vary it.
"""
from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from typing import Sequence

import numpy as np

from mmjax.config import as_dict
from mmjax.data import shapes
from mmjax.data.folder import ImageFolderSource
from mmjax.data.transforms import ResizeImage
from mmjax.errors import ConfigError

SOURCES = ("shapes_classes", "image_folder")


def class_split(num_classes: int, base_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Sorted `(base, novel)` class ids."""
  n_base = int(round(base_fraction * num_classes))
  if not 0 < n_base < num_classes:
    raise ConfigError(f"data.base_fraction={base_fraction} leaves no base or no novel class of {num_classes}")
  order = np.random.default_rng(seed).permutation(num_classes)
  return np.sort(order[:n_base]), np.sort(order[n_base:])


def kshot_indices(labels: np.ndarray, k: int, classes: Sequence[int] | None = None, seed: int = 0) -> np.ndarray:
  """Sorted indices of k examples per class (default: every class present), drawn without replacement."""
  labels = np.asarray(labels)
  if k < 1:
    raise ConfigError(f"kshot_indices: k={k} must be at least 1")
  rng = np.random.default_rng(seed)
  picks = []
  for c in np.unique(labels if classes is None else np.asarray(classes)):
    pool = np.flatnonzero(labels == c)
    if len(pool) < k:
      raise ConfigError(f"kshot_indices: class {c} has {len(pool)} examples, fewer than k={k}")
    picks.append(rng.choice(pool, size=k, replace=False))
  return np.sort(np.concatenate(picks)) if picks else np.zeros((0,), np.int64)


class ArrayRecords:
  """Grain random-access source of dict(image, label) over in-memory arrays."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, name: str):
    self.images, self.labels, self.name = images, labels, name

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return dict(image=self.images[index], label=np.int32(self.labels[index]))

  def __repr__(self) -> str:  # Grain checks a restored iterator against it.
    return f"ArrayRecords({self.name}, records={len(self)})"


@dataclasses.dataclass
class ClassData:
  """Class names, the split, the k-shot training records and the test images (uint8 at image_size)."""
  class_names: list[str]
  base: np.ndarray
  novel: np.ndarray
  train: ArrayRecords
  test_images: np.ndarray
  test_labels: np.ndarray
  skipped: int  # Unreadable files left out (data.on_bad_image="skip"): fewer shots or test images.

  def test_set(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`(images, labels)` of the test images of the "base" or "novel" classes, labels indexing
    that split's classes."""
    classes = {"base": self.base, "novel": self.novel}[split]
    rows = np.isin(self.test_labels, classes)
    return self.test_images[rows], np.searchsorted(classes, self.test_labels[rows]).astype(np.int32)


def _key(data_config) -> str:
  d = as_dict(data_config)
  return json.dumps({k: d.get(k) for k in ("source", "image_root", "image_size", "shots", "base_fraction",
                                           "split_seed", "shot_seed", "test_per_class", "seed",
                                           "on_bad_image")}, sort_keys=True)


def load(data_config) -> ClassData:
  """The `ClassData` of `config.data` (cached: the trainer's source and the task share it)."""
  return _load(_key(data_config))


@lru_cache(maxsize=4)
def _load(key: str) -> ClassData:
  d = json.loads(key)
  size, shots, test_n = d["image_size"], d["shots"], d["test_per_class"]
  if d["source"] == "shapes_classes":
    names = list(shapes.CLASS_NAMES)
    base, novel = class_split(len(names), d["base_fraction"], d["split_seed"])
    images, labels = shapes.class_images(base, shots, d["seed"], size, few_shot=True, draw=d["shot_seed"])
    test_images, test_labels = shapes.class_images(range(len(names)), test_n, d["seed"], size)
    skipped = 0
  elif d["source"] == "image_folder":
    folder = ImageFolderSource(d["image_root"], on_bad_image=d["on_bad_image"])
    names = [n.replace("_", " ") for n in folder.class_names]
    base, novel = class_split(len(names), d["base_fraction"], d["split_seed"])
    labels_all = np.asarray(folder.labels)
    short = [f"{folder.class_names[c]} ({int(np.sum(labels_all == c))})" for c in base
             if np.sum(labels_all == c) < shots]
    if short:
      raise ConfigError(f"data.shots={shots}: base classes of data.image_root={d['image_root']} with fewer "
                        f"images (count in brackets): {', '.join(short)}")
    train_rows = kshot_indices(labels_all, shots, base, seed=d["shot_seed"])
    rest = np.setdiff1d(np.arange(len(labels_all)), train_rows)
    test_rows = np.concatenate([rest[labels_all[rest] == c][:test_n] for c in range(len(names))])
    resize = ResizeImage(size)

    def read(rows):
      records = [folder[int(i)] for i in rows]
      kept = [(resize.map(r)["image"], r["label"]) for r in records if r is not None]
      if not kept:
        raise ConfigError(f"data.image_root={d['image_root']}: no readable image among {len(rows)} files")
      return np.stack([k[0] for k in kept]), np.array([k[1] for k in kept], np.int32), len(rows) - len(kept)

    images, labels, skipped = read(train_rows)
    test_images, test_labels, skipped_test = read(test_rows)
    skipped += skipped_test
  else:
    raise ConfigError(f"data.source={d['source']!r} for class data; expected one of {SOURCES}")
  return ClassData(names, base, novel, ArrayRecords(images, labels, f"{d['source']} shots={shots}"),
                   test_images, test_labels, skipped)
