"""Grain pipelines: source -> this process's share of each global batch -> preprocess -> batches.

Global batch k is records [k * R, (k + 1) * R) of one seeded, per-epoch shuffle of the
source (R records per global batch); process p of P reads only its contiguous slice of
R / P of them. Which examples form a global batch, and their order, therefore does not
depend on how many processes read it: 2 processes x 4 devices train on exactly the
batches of 1 process x 8 devices, and a run restored on another process count
continues with the batches it would have seen (`make_iterator(start_batch=step)`).

Unreadable images (`data.on_bad_image="skip"`) do not change that: record i of the source
with an unreadable image is replaced by a readable record that depends on i and the seed
alone (`_Readable`), before the shuffle, so every process and worker puts the same record
in its place.

Every batch is a dict of numpy arrays {"image": float32 [b, S, S, 3], "text": int32
[b, L]} (or "label" for class folders) plus SKIPPED, str [k, 2]: the (file, reason) of
each unreadable record replaced in this process's rows of the batch. It travels with the
batch, so it is exact with worker processes too; pop it before turning the batch into a
global array and hand it to `SkippedImages`, which shares it among the processes, counts
distinct files and names each once. Finite loaders that keep the remainder (`num_epochs`
set, `drop_remainder=False`) pad the last global batch with repeated records and add VALID,
a bool per example (False for padding and for stand-ins of unreadable records), so every
readable record counts exactly once.

The iterator's state is checkpointed with the training state by
`mmjax.checkpoint.Checkpointer` (grain's Orbax handler; one file per JAX process).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import grain
import jax
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils

from mmjax.data import classes
from mmjax.data.folder import CaptionFolderSource
from mmjax.data.records import ArrayRecordSource, WebDatasetSource
from mmjax.data.shapes import ShapesLabelSource, ShapesSource
from mmjax.data.shapes_vqa import ShapesVQALabelSource, ShapesVQASource
from mmjax.data.tokenizer import Tokenizer
from mmjax.data.transforms import NormalizeImage, ResizeImage, Tokenize, augmentation_ops
from mmjax.errors import BadImageError, ConfigError, DataError

SKIPPED = "skipped"
VALID = "valid"
SKIPPED_FILE = "skipped.jsonl"
_AUGMENT_STREAM = 1  # Keeps the augmentation's draws apart from `_Readable`'s, which share (seed, index).
# Training augmentation (`data.augment`) applies to these: user data. The shapes scenes are never
# augmented, since a flip or a crop changes what their captions say ("left of", "at the top").
AUGMENTED_SOURCES = ("folder", "webdataset", "array_record")
SOURCES = ("shapes", "shapes_vqa", "shapes_vqa_labels", "shapes_labels", "folder", "webdataset", "array_record",
           "shapes_classes", "image_folder")


class _Readable:
  """The source as a random-access source of `(record, skipped)`: skipped is None, or for a
  record whose image is unreadable under `on_bad_image="skip"` (a `SkipsBadImages` source),
  its (file, reason), and record is then a readable stand-in.

  The stand-in for record i is the first readable one of records (i + 1 + (o + k) mod (N - 1))
  mod N, k = 0 .. N - 2 (every other record once), with o drawn from (seed, i): a function of
  the data alone, and from anywhere in the source rather than from i's batch, where a
  duplicate pair would be a false negative of the contrastive loss.
  """

  def __init__(self, source, seed: int):
    self.source, self.seed = source, seed
    self.skip = getattr(source, "on_bad_image", None) == "skip"

  def __len__(self) -> int:
    return len(self.source)

  def __repr__(self) -> str:  # Grain validates restored iterator state against it.
    return repr(self.source)

  def __getitem__(self, index: int):
    if not self.skip:
      return self.source[index], None
    try:
      return self.source.read(index), None
    except BadImageError as e:
      skipped = (self.source.record_name(index), str(e))
    n = len(self.source)
    offset = int(np.random.default_rng([self.seed, index]).integers(max(n - 1, 1)))
    for k in range(n - 1):
      try:
        return self.source.read((index + 1 + (offset + k) % (n - 1)) % n), skipped
      except BadImageError:
        continue
    raise DataError(f"{self.source!r}: no readable image among its {n} records, so none can stand in for "
                    f"{skipped[0]} ({skipped[1]}); check the image files")


class _ProcessSlice(grain.MapDataset):
  """This process's elements of every global batch, as `(element, valid, global position)`.

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
    return self._parent[position if valid else position % self._total], valid, position

  def __str__(self) -> str:
    return f"ProcessSlice(records_per_batch={self._global}, offset={self._offset})"


@dataclasses.dataclass
class _Preprocess:
  """((record or group of records, skipped), valid, position) -> (list of model-ready examples, skipped);
  random ops draw from a generator of the seed and the record's global position."""
  ops: list
  with_valid: bool
  seed: int

  def __call__(self, element):
    (record, skipped), valid, position = element
    rng = np.random.default_rng([self.seed, position, _AUGMENT_STREAM])
    examples = []
    for example in (record if isinstance(record, list) else [record]):
      for op in self.ops:
        example = op.random_map(example, rng) if isinstance(op, grain.transforms.RandomMap) else op.map(example)
      examples.append(example | {VALID: valid and skipped is None} if self.with_valid else example)
    return examples, skipped


def _collate(elements: list[tuple[list[dict], tuple | None]]) -> dict:
  """Stacks a batch (groups flattened in order) with the (file, reason) of its stand-ins as SKIPPED."""
  examples = [example for group, _ in elements for example in group]
  # A key may hold a dict of arrays (a NaFlex image's patches and grid).
  batch = {key: jax.tree.map(lambda *rows: np.stack(rows), *[e[key] for e in examples]) for key in examples[0]}
  batch[SKIPPED] = np.array([skipped for _, skipped in elements if skipped is not None], str).reshape(-1, 2)
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
  ops: list | None = None  # Per-example transforms; None: resize (or `augment`), normalise, tokenize captions.
  augment: list | None = None  # Image ops replacing the resize (`augmentation`), for the default ops.

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
    ds = grain.MapDataset.source(_Readable(self.source, self.seed))
    if self.shuffle:
      ds = ds.shuffle(seed=self.seed)
    ds = ds.repeat(self.num_epochs)  # Each epoch is reshuffled.
    pad = not self.drop_remainder and self.num_epochs is not None
    ds = _ProcessSlice(ds, self.global_batch_size // self.group_size, jax.process_index(),
                       jax.process_count(), start_batch, pad)
    ops = self.ops
    if ops is None:
      ops = [*(self.augment or [ResizeImage(self.image_size)]), NormalizeImage()]
      if self.tokenizer is not None:
        ops.append(Tokenize(self.tokenizer, self.max_len))
    ds = (ds.map(_Preprocess(ops, with_valid=pad, seed=self.seed))
          .to_iter_dataset(grain.ReadOptions(num_threads=0))
          .batch(self.local_batch_size // self.group_size, drop_remainder=self.drop_remainder,
                 batch_fn=_collate))
    if self.worker_count:
      if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; notebooks never parse them.
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count))
    return iter(ds)

  def __iter__(self):
    return self.make_iterator()


class SkippedImages:
  """The distinct unreadable images a run has met, over all its processes.

  `add` takes each batch's SKIPPED; `gather` is a collective (every process calls it at the
  same steps): it shares the files met since the last call, and process 0 logs each new
  file once and appends it to WORKDIR/skipped.jsonl, a line {"path": ..., "reason": ...} a
  file. A resumed run (`resume=True`) starts from the files that file lists.
  """

  def __init__(self, workdir: str, resume: bool):
    self.path = os.path.join(workdir, SKIPPED_FILE)
    self.files: dict[str, str] = {}  # file -> reason, the same on every process after `gather`.
    self._new: dict[str, str] = {}
    if resume and os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        self.files = {r["path"]: r["reason"] for r in map(json.loads, f)}
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      with open(self.path, "a" if resume else "w", encoding="utf-8"):
        pass

  def add(self, skipped: np.ndarray) -> None:
    self._new.update((path, reason) for path, reason in skipped.tolist() if path not in self.files)

  def gather(self) -> int:
    """The number of distinct files skipped so far by all processes."""
    new = {}
    for text in _gather_text(json.dumps(self._new) if self._new else ""):
      new.update((path, reason) for path, reason in json.loads(text or "{}").items() if path not in self.files)
    self.files.update(new)
    self._new = {}
    if new and jax.process_index() == 0:
      with open(self.path, "a", encoding="utf-8") as f:
        for path, reason in new.items():
          logging.warning("skipped unreadable image %s: %s", path, reason)
          f.write(json.dumps({"path": path, "reason": reason}) + "\n")
    return len(self.files)


def _gather_text(text: str) -> list[str]:
  """Every process's `text`, in process order (a collective)."""
  if jax.process_count() == 1:
    return [text]
  data = np.frombuffer(text.encode("utf-8"), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32))).reshape(-1)
  if not lengths.any():
    return [""] * len(lengths)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [bytes(row[:n]).decode("utf-8") for row, n in zip(rows, lengths)]


def augmentation(data_config) -> list | None:
  """The loader's `augment` ops for `data_config`: `data.augment` for user data, None otherwise."""
  if data_config.get("source") not in AUGMENTED_SOURCES or "augment" not in data_config:
    return None
  return augmentation_ops(data_config.augment, data_config.image_size)


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
                        twins=data_config.get("twins", False),
                        aspect_ratios=tuple(data_config.get("aspect_ratios", ())),
                        regions=data_config.get("regions", False))
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
                               image_root=data_config.get("image_root") or None,  # "": the captions' folder.
                               on_bad_image=data_config.get("on_bad_image", "skip"),
                               csv_image_key=data_config.get("csv_image_key", ""),
                               csv_caption_key=data_config.get("csv_caption_key", ""),
                               csv_separator=data_config.get("csv_separator", ""),
                               regions=data_config.get("regions", False))
  if kind in classes.SOURCES:
    return classes.load(data_config).train
  if kind in ("webdataset", "array_record"):
    if not data_config.get("shards"):
      raise ConfigError(f"data.shards: required (a glob of files) when data.source={kind!r}")
    source_class = WebDatasetSource if kind == "webdataset" else ArrayRecordSource
    return source_class(data_config.get("shards"), on_bad_image=data_config.get("on_bad_image", "skip"))
  raise ConfigError(f"data.source={kind!r}: expected one of {SOURCES}")

