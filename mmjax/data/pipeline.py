"""Grain loaders: source -> drop unreadable records -> preprocess -> per-process batches.

Every batch is a dict of numpy arrays {"image": float32 [b, S, S, 3], "text": int32
[b, L]} (or "label" for class folders) plus SKIPPED, an int32 scalar counting the
records dropped as unreadable while assembling that batch. The count travels
with the batch, so it is exact with worker processes too; pop it before turning
the batch into a global array, and sum it over steps (and processes) for logs.
Records skipped after the last batch of a finite loader (`num_epochs` set) are
not reported; training loaders are infinite.

The iterator's state is checkpointed with the training state by
`mmjax.checkpoint.Checkpointer` (grain's Orbax handler; one file per JAX process).
"""
import dataclasses

import grain
import jax
import numpy as np

from mmjax.data.folder import CaptionFolderSource
from mmjax.data.shapes import ShapesSource
from mmjax.data.tokenizer import Tokenizer
from mmjax.data.transforms import NormalizeImage, RandomFlip, ResizeImage, Tokenize
from mmjax.errors import ConfigError, DataError

SKIPPED = "skipped"
SOURCES = ("shapes", "folder")


class _DropBad(grain.transforms.Filter):
  """Drops records a source returned as None, counting them until the next batch."""

  def __init__(self, source_name: str, limit: int):
    self.source_name, self.limit, self.count = source_name, limit, 0

  def filter(self, element) -> bool:
    if element is not None:
      return True
    self.count += 1
    if self.count >= self.limit:  # Otherwise an infinite loader would spin forever.
      raise DataError(f"{self.source_name}: {self.count} unreadable records without "
                      "filling one batch; check the image files")
    return False


class _Ungroup(grain.experimental.FlatMapTransform):
  """Splits a record that is a group of related samples (e.g. hard-negative twins)."""

  def __init__(self, group_size: int):
    self.max_fan_out = group_size

  def flat_map(self, element):
    return element


@dataclasses.dataclass
class _Collate:
  """Stacks a batch and attaches the number of records dropped while collecting it."""
  drop_bad: _DropBad

  def __call__(self, elements: list[dict]) -> dict:
    batch = {key: np.stack([e[key] for e in elements]) for key in elements[0]}
    batch[SKIPPED] = np.int32(self.drop_bad.count)
    self.drop_bad.count = 0
    return batch


def make_loader(source, *, tokenizer: Tokenizer | None, image_size: int, max_len: int,
                global_batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, worker_count: int = 0,
                drop_remainder: bool = True, random_flip: bool = False,
                read_threads: int = 0) -> grain.DataLoader:
  """A DataLoader yielding this process's share of each global batch.

  `tokenizer=None` keeps the source's non-caption fields as they are (e.g. class
  labels); `random_flip` must stay off for shapes, whose captions name positions.
  `read_threads` > 0 reads records ahead in threads. That only pays off for
  sources that release the GIL (file decoding on slow storage): for the shapes
  renderer on 2 cores, 16 threads are 3-4x slower than reading on demand. Use
  `worker_count` processes for parallelism.
  """
  processes = jax.process_count()
  if global_batch_size % processes:
    raise ConfigError(f"data.batch_size={global_batch_size}: expected a multiple of the "
                      f"number of JAX processes ({processes})")
  shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  sampler = grain.samplers.IndexSampler(len(source), shard_options=shard, shuffle=shuffle,
                                        num_epochs=num_epochs, seed=seed)
  drop_bad = _DropBad(repr(source), limit=len(source))
  ops = [drop_bad]
  group_size = getattr(source, "group_size", 1)
  if group_size > 1:
    if (global_batch_size // processes) % group_size:
      raise ConfigError(f"data.batch_size={global_batch_size}: each process's share must be a "
                        f"multiple of the source's group size {group_size}, so groups stay in one batch")
    ops.append(_Ungroup(group_size))
  ops.append(ResizeImage(image_size))
  if random_flip:
    ops.append(RandomFlip())
  ops.append(NormalizeImage())
  if tokenizer is not None:
    ops.append(Tokenize(tokenizer, max_len))
  ops.append(grain.transforms.Batch(global_batch_size // processes, drop_remainder,
                                    batch_fn=_Collate(drop_bad)))
  return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                          worker_count=worker_count, shard_options=shard,
                          read_options=grain.ReadOptions(num_threads=read_threads))


def make_source(data_config):
  """The training source named by `data_config.source` ("shapes" or "folder")."""
  kind = data_config.get("source")
  if kind == "shapes":
    return ShapesSource(seed=data_config.get("seed", 0),
                        image_size=data_config.get("image_size", 64),
                        held_out_fraction=data_config.get("held_out_fraction", 0.2),
                        twins=data_config.get("twins", False))
  if kind == "folder":
    if not data_config.get("captions"):
      raise ConfigError("data.captions: required (a JSONL or CSV caption file) when "
                        "data.source='folder'")
    return CaptionFolderSource(data_config.get("captions"),
                               image_root=data_config.get("image_root"),
                               on_bad_image=data_config.get("on_bad_image", "skip"))
  raise ConfigError(f"data.source={kind!r}: expected one of {SOURCES}")

