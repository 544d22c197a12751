"""Sharded image-caption records: webdataset tar shards (as img2dataset writes them) and
array_record files (grain's random-access format, written by `python -m mmjax.data.write_records`).

Both are grain random-access sources of dict(image=uint8 [H, W, 3], caption=str), or None
for an unreadable image under `on_bad_image="skip"`. Being random access, they shard by
record, not by file: any number of processes and workers share any number of shards, and
every record is read exactly once per epoch by exactly one process.
"""
from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from typing import NamedTuple

import grain
import msgpack

from mmjax.data.folder import IMAGE_EXTENSIONS, SkipsBadImages, check_policy, load_image
from mmjax.data.tokenizer_base import check_text
from mmjax.errors import DataError

CAPTION_EXTENSIONS = ("txt", "json")


def expand_shards(pattern: str, what: str) -> list[str]:
  """Sorted files matching a glob or a comma-separated list of globs."""
  paths = sorted(p for part in pattern.split(",") if part for p in glob.glob(os.path.expanduser(part)))
  if not paths:
    raise DataError(f"data.shards={pattern!r}: no {what} files match")
  return paths


class _Member(NamedTuple):
  offset: int
  size: int


class _Sample(NamedTuple):
  shard: int
  key: str
  image: _Member
  caption: _Member
  caption_kind: str  # "txt" or "json"


def _index_shard(path: str, shard: int) -> tuple[list[_Sample], int]:
  """Samples of one tar (headers only; no data is read) and the count of incomplete ones."""
  members: dict[str, dict[str, _Member]] = {}
  try:
    with tarfile.open(path, "r:") as tar:
      for info in tar:
        if not info.isfile():
          continue
        directory, _, base = info.name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if dot:
          key = f"{directory}/{stem}" if directory else stem
          members.setdefault(key, {})[ext.lower()] = _Member(info.offset_data, info.size)
  except (OSError, tarfile.TarError) as e:
    raise DataError(f"{path}: not a readable uncompressed tar shard ({e})") from e
  samples, incomplete = [], 0
  for key, parts in members.items():
    image = next((parts[e] for e in parts if f".{e}" in IMAGE_EXTENSIONS), None)
    kind = next((e for e in CAPTION_EXTENSIONS if e in parts), None)
    if image is None or kind is None:
      incomplete += 1
      continue
    samples.append(_Sample(shard, key, image, parts[kind], kind))
  return samples, incomplete


def _caption(raw: bytes, kind: str, name: str) -> str:
  if kind == "txt":
    try:
      return raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
      raise DataError(f"{name}.txt: not UTF-8 text ({e})") from e
  try:
    caption = json.loads(raw).get("caption")
  except (ValueError, AttributeError) as e:
    raise DataError(f"{name}.json: invalid JSON ({e})") from e
  return check_text(caption, f'{name}.json: "caption"')


class WebDatasetSource(SkipsBadImages):
  """Samples `KEY.{jpg,png,webp,...}` + `KEY.txt` (or `KEY.json` with "caption") from tar shards.

  The constructor reads every shard's headers (not its data) to index the samples, which
  takes a moment per thousand shards; for many millions of samples convert once to
  array_record. Samples lacking an image or a caption are left out and counted in
  `incomplete`.
  """

  def __init__(self, shards: str, on_bad_image: str = "skip"):
    check_policy(on_bad_image)
    self.pattern, self.on_bad_image = shards, on_bad_image
    self.paths = expand_shards(shards, "tar")
    self._samples, self.incomplete = [], 0
    for shard, path in enumerate(self.paths):
      samples, incomplete = _index_shard(path, shard)
      self._samples += samples
      self.incomplete += incomplete
    if not self._samples:
      raise DataError(f"data.shards={shards!r}: no image+caption samples in {len(self.paths)} tar files")

  def __len__(self) -> int:
    return len(self._samples)

  def record_name(self, index: int) -> str:
    sample = self._samples[index]
    return f"{self.paths[sample.shard]}:{sample.key}"

  def encoded(self, index: int) -> tuple[bytes, str, str]:
    """(encoded image bytes, caption, record name) of sample `index`, without decoding."""
    sample = self._samples[index]
    with open(self.paths[sample.shard], "rb") as f:
      f.seek(sample.image.offset)
      image = f.read(sample.image.size)
      f.seek(sample.caption.offset)
      raw_caption = f.read(sample.caption.size)
    name = self.record_name(index)
    return image, _caption(raw_caption, sample.caption_kind, name), name

  def read(self, index: int) -> dict:
    image, caption, name = self.encoded(index)
    return dict(image=load_image(io.BytesIO(image), name), caption=caption)

  def __repr__(self) -> str:  # Grain validates restored iterator state against it.
    return f"WebDatasetSource({self.pattern!r}, records={len(self)})"


def pack_record(image: bytes, caption: str) -> bytes:
  """One array_record record: msgpack {"image": encoded bytes, "caption": str}."""
  return msgpack.packb({"image": image, "caption": caption}, use_bin_type=True)


class ArrayRecordSource(SkipsBadImages):
  """Records written by `python -m mmjax.data.write_records`, read with grain's ArrayRecordDataSource."""

  def __init__(self, shards: str, on_bad_image: str = "skip"):
    check_policy(on_bad_image)
    self.pattern, self.on_bad_image = shards, on_bad_image
    self.paths = expand_shards(shards, "array_record")
    self._records = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._records)

  def record_name(self, index: int) -> str:
    return f"{self.pattern}[{index}]"

  def read(self, index: int) -> dict:
    try:
      record = msgpack.unpackb(self._records[index], raw=False)
      image, caption = record["image"], record["caption"]
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
      raise DataError(f"{self.pattern}: record {index} is not an mmjax image-caption record ({e})") from e
    if not (isinstance(image, bytes) and isinstance(caption, str)):
      raise DataError(f'{self.pattern}: record {index} is not an mmjax image-caption record (expected bytes '
                      f'"image" and str "caption", got {type(image).__name__} and {type(caption).__name__})')
    return dict(image=load_image(io.BytesIO(image), self.record_name(index)), caption=caption)

  def __repr__(self) -> str:
    return f"ArrayRecordSource({self.pattern!r}, records={len(self)})"
