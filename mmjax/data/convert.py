"""Converts image-caption data to array_record shards, grain's random-access format.

  python -m mmjax.data.convert --from folder --source captions.jsonl --out data/ar
  python -m mmjax.data.convert --from webdataset --source 'shards/{0000..0099}.tar' --out data/ar

`--from folder` takes a JSONL or CSV caption file (images relative to `--image_root`, by
default the caption file's directory); `--from webdataset` takes a glob (or comma-separated
globs) of img2dataset tar shards. Images are stored as their original encoded bytes; ones
that do not decode are left out and counted. Train on the result with
`--config.data.source=array_record --config.data.shards='data/ar/*.array_record'`.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
from typing import Iterator

from array_record.python.array_record_module import ArrayRecordWriter

from mmjax.data.folder import CaptionFolderSource, load_image
from mmjax.data.records import WebDatasetSource, pack_record
from mmjax.errors import BadImageError, MMJaxError

FORMATS = ("folder", "webdataset")


def _encoded(kind: str, source: str, image_root: str | None) -> tuple[int, Iterator[tuple[bytes, str, str]]]:
  """(record count, iterator of (encoded image, caption, name))."""
  if kind == "folder":
    folder = CaptionFolderSource(source, image_root=image_root)

    def records():
      for i, caption in enumerate(folder.captions):
        path = folder.image_path(i)
        try:
          yield path.read_bytes(), caption, str(path)
        except OSError:
          yield b"", caption, str(path)  # Counted as unreadable below.
    return len(folder), records()
  shards = WebDatasetSource(source)
  return len(shards), (shards.encoded(i) for i in range(len(shards)))


def convert(kind: str, source: str, out: str, *, image_root: str | None = None,
            records_per_shard: int = 10_000, log=print) -> dict:
  """Writes `out/data-SSSSS-of-NNNNN.array_record`; returns counts of what was written."""
  if kind not in FORMATS:
    raise MMJaxError(f"--from={kind!r}: expected one of {FORMATS}")
  total, records = _encoded(kind, source, image_root)
  num_shards = max(1, math.ceil(total / records_per_shard))
  os.makedirs(out, exist_ok=True)
  written, skipped, shard, writer = 0, [], -1, None
  for image, caption, name in records:
    try:
      load_image(io.BytesIO(image), name)
    except BadImageError as e:
      skipped.append(str(e))
      continue
    if written % records_per_shard == 0:
      if writer is not None:
        writer.close()
      shard += 1
      writer = ArrayRecordWriter(os.path.join(out, f"data-{shard:05d}-of-{num_shards:05d}.array_record"),
                                 "group_size:1")
    writer.write(pack_record(image, caption))
    written += 1
  if writer is not None:
    writer.close()
  for message in skipped[:5]:
    log(f"skipped: {message}")
  log(f"wrote {written} records in {shard + 1} shards to {out}; skipped {len(skipped)} unreadable images")
  return {"written": written, "skipped": len(skipped), "shards": shard + 1}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mmjax.data.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="kind", required=True, choices=FORMATS)
  parser.add_argument("--source", required=True, help="Caption file (folder) or tar shard glob (webdataset).")
  parser.add_argument("--out", required=True, help="Output directory for the array_record shards.")
  parser.add_argument("--image_root", default=None, help="Folder: base of relative image paths.")
  parser.add_argument("--records_per_shard", type=int, default=10_000)
  args = parser.parse_args(argv)
  try:
    convert(args.kind, args.source, args.out, image_root=args.image_root,
            records_per_shard=args.records_per_shard)
  except MMJaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
