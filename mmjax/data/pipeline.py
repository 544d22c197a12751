"""Grain pipelines: source -> this process's share of each global batch -> preprocess -> batches.

Global batch k is records [k * R, (k + 1) * R) of one seeded, per-epoch shuffle of the
source (R records per global batch); process p of P reads only its contiguous slice of
R / P of them. Which examples form a global batch, and their order, therefore does not
depend on how many processes read it: 2 processes x 4 devices train on exactly the
batches of 1 process x 8 devices, and a run restored on another process count
continues with the batches it would have seen (`make_iterator(start_batch=step)`).

Every batch is a dict of numpy arrays {"image": float32 [b, S, S, 3], "text": int32
[b, L]} (or "label" for class folders) plus SKIPPED, an int32 scalar counting the
records dropped as unreadable while assembling that batch. The count travels
with the batch, so it is exact with worker processes too; pop it before turning
the batch into a global array, and sum it over steps (and processes) for logs.
Finite loaders that keep the remainder (`num_epochs` set, `drop_remainder=False`)
pad the last global batch with repeated records and add VALID, a bool per example,
so every record counts exactly once.

The iterator's state is checkpointed with the training state by
`mmjax.checkpoint.Checkpointer` (grain's Orbax handler; one file per JAX process).
"""
from __future__ import annotations

import dataclasses
import math
import sys

import grain
import jax
import numpy as np
from absl import flags

from mmjax.data import classes
from mmjax.data.folder import CaptionFolderSource
from mmjax.data.records import ArrayRecordSource, WebDatasetSource
from mmjax.data.shapes import ShapesLabelSource, ShapesSource
from mmjax.data.shapes_vqa import ShapesVQALabelSource, ShapesVQASource
from mmjax.data.tokenizer import Tokenizer
from mmjax.data.transforms import NormalizeImage, ResizeImage, Tokenize
from mmjax.errors import ConfigError, DataError

SKIPPED = "skipped"
VALID = "valid"
SOURCES = ("shapes", "shapes_vqa", "shapes_vqa_labels", "shapes_labels", "folder", "webdataset", "array_record",
           "shapes_classes", "image_folder")


# Stands in for a record the source returned as None, so that it reaches the counter
# (grain's iterators drop None silently).
_UNREADABLE = object()


class _ProcessSlice(grain.MapDataset):
  """This process's records of every global batch, as `(record, valid)`.

  Local index i is global position (start_batch + i // r) * R + process * r + i % r,
  with r = R / processes. Positions past the end of a finite parent pad the last
  batch (`pad=True`, valid=False, a repeated record) or are cut off (`pad=False`).
  """

  def __init__(self, parent: grain.MapDataset, records_per_batch: int, process_index: int,
               process_count: int, start_batch: int, pad: bool):
    super().__init__(parent)
    self._global, self._local = records_per_batch, records_per_batch // process_count
    self._offset, self._start, self._total = process_index * self._local, start_batch, len(parent)
    if self._total >= sys.maxsize:
      batches = sys.maxsize // records_per_batch - start_batch
    else:
      batches = (math.ceil if pad else math.floor)(self._total / records_per_batch) - start_batch
    self._len = max(batches, 0) * self._local

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, self._local)
    position = (self._start + batch) * self._global + self._offset + row
    valid = position < self._total
    return self._parent[position if valid else position % self._total], valid

  def __str__(self) -> str:
    return f"ProcessSlice(records_per_batch={self._global}, offset={self._offset})"


@dataclasses.dataclass
class _Preprocess:
  """(record or group of records, valid) -> list of model-ready examples, or _UNREADABLE."""
  ops: list
  with_valid: bool

  def __call__(self, element):
    record, valid = element
    if record is None:
      return _UNREADABLE
    examples = []
    for example in (record if isinstance(record, list) else [record]):
      for op in self.ops:
        example = op.map(example)
      examples.append(example | {VALID: valid} if self.with_valid else example)
    return examples


class _DropUnreadable(grain.transforms.Filter):
  """Drops unreadable records, counting them until the next batch."""

  def __init__(self, source_name: str, limit: int):
    self.source_name, self.limit, self.count = source_name, limit, 0

  def filter(self, element) -> bool:
    if element is not _UNREADABLE:
      return True
    self.count += 1
    if self.count >= self.limit:  # Otherwise an infinite loader would spin forever.
      raise DataError(f"{self.source_name}: {self.count} unreadable records without "
                      "filling one batch; check the image files")
    return False


@dataclasses.dataclass
class _Collate:
  """Stacks a batch (groups flattened in order) and attaches the number of records dropped
  while collecting it."""
  drop: _DropUnreadable

  def __call__(self, groups: list[list[dict]]) -> dict:
    examples = [example for group in groups for example in group]
    batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
    batch[SKIPPED] = np.int32(self.drop.count)
    self.drop.count = 0
    return batch


@dataclasses.dataclass
class Loader:
  """Builds iterators over this process's share of each global batch (see the module doc)."""
  source: object
  tokenizer: Tokenizer | None
  image_size: int
  max_len: int
  global_batch_size: int
  seed: int
  shuffle: bool = True
  num_epochs: int | None = None
  worker_count: int = 0
  drop_remainder: bool = True
  ops: list | None = None  # Per-example transforms; None: resize, normalise, tokenize captions.

  def __post_init__(self):
    processes = jax.process_count()
    self.group_size = getattr(self.source, "group_size", 1)
    if self.global_batch_size % (processes * self.group_size):
      raise ConfigError(
          f"data.batch_size={self.global_batch_size}: expected a multiple of the number of JAX "
          f"processes ({processes}) times the source's group size ({self.group_size}), so each "
          "process holds whole groups")
    self.local_batch_size = self.global_batch_size // processes

  def make_iterator(self, start_batch: int = 0) -> grain.DatasetIterator:
    """An iterator starting at global batch `start_batch` of the (first) epoch sequence."""
    ds = grain.MapDataset.source(self.source)
    if self.shuffle:
      ds = ds.shuffle(seed=self.seed)
    ds = ds.repeat(self.num_epochs)  # Each epoch is reshuffled.
    pad = not self.drop_remainder and self.num_epochs is not None
    ds = _ProcessSlice(ds, self.global_batch_size // self.group_size, jax.process_index(),
                       jax.process_count(), start_batch, pad)
    ops = self.ops
    if ops is None:
      ops = [ResizeImage(self.image_size), NormalizeImage()]
      if self.tokenizer is not None:
        ops.append(Tokenize(self.tokenizer, self.max_len))
    drop = _DropUnreadable(repr(self.source), limit=len(self.source))
    ds = (ds.map(_Preprocess(ops, with_valid=pad))
          .to_iter_dataset(grain.ReadOptions(num_threads=0))
          .filter(drop)
          .batch(self.local_batch_size // self.group_size, drop_remainder=self.drop_remainder,
                 batch_fn=_Collate(drop)))
    if self.worker_count:
      if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; notebooks never parse them.
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count))
    return iter(ds)

  def __iter__(self):
    return self.make_iterator()


def make_source(data_config):
  """The training source named by `data_config.source` (one of SOURCES). A retrieval-augmented
  source (`data.rag`) is the generative task's (`GenerativeTask.source`), not built here."""
  kind = data_config.get("source")
  if data_config.get("rag"):
    raise ConfigError("data.rag: needs task='generative', whose source() retrieves the captions; "
                      f"data.source={kind!r} alone builds no retrieval-augmented source")
  if kind == "shapes":
    return ShapesSource(seed=data_config.get("seed", 0),
                        image_size=data_config.get("image_size", 64),
                        held_out_fraction=data_config.get("held_out_fraction", 0.2),
                        twins=data_config.get("twins", False))
  if kind == "shapes_vqa":
    return ShapesVQASource(seed=data_config.get("seed", 0), image_size=data_config.get("image_size", 64),
                           held_out_fraction=data_config.get("held_out_fraction", 0.2),
                           caption_fraction=data_config.get("caption_fraction", 0.25),
                           media_per_record=data_config.get("media_per_record", 1),
                           described_fraction=data_config.get("described_fraction", 0.0))
  if kind == "shapes_vqa_labels":
    return ShapesVQALabelSource(seed=data_config.get("seed", 0), image_size=data_config.get("image_size", 64),
                                held_out_fraction=data_config.get("held_out_fraction", 0.2))
  if kind == "shapes_labels":
    return ShapesLabelSource(seed=data_config.get("seed", 0), image_size=data_config.get("image_size", 64))
  if kind == "folder":
    if not data_config.get("captions"):
      raise ConfigError("data.captions: required (a JSONL or CSV caption file) when "
                        "data.source='folder'")
    return CaptionFolderSource(data_config.get("captions"),
                               image_root=data_config.get("image_root"),
                               on_bad_image=data_config.get("on_bad_image", "skip"))
  if kind in classes.SOURCES:
    return classes.load(data_config).train
  if kind in ("webdataset", "array_record"):
    if not data_config.get("shards"):
      raise ConfigError(f"data.shards: required (a glob of files) when data.source={kind!r}")
    source_class = WebDatasetSource if kind == "webdataset" else ArrayRecordSource
    return source_class(data_config.get("shards"), on_bad_image=data_config.get("on_bad_image", "skip"))
  raise ConfigError(f"data.source={kind!r}: expected one of {SOURCES}")

