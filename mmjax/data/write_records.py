"""Converts image-caption data to array_record shards, grain's random-access format.

  python -m mmjax.data.write_records --from folder --source captions.jsonl --out data/ar
  python -m mmjax.data.write_records --from webdataset --source 'shards/*.tar' --out data/ar

`--from folder` takes a JSONL or CSV caption file (images relative to `--image_root`, by
default the caption file's directory); `--from webdataset` takes a glob (or comma-separated
globs) of img2dataset tar shards. Images are stored as their original encoded bytes; ones
that do not decode are left out and counted. Train on the result with
`--config.data.source=array_record --config.data.shards='data/ar/*.array_record'`.
"""
from __future__ import annotations

import argparse
import io
import os
from typing import Iterator

from array_record.python.array_record_module import ArrayRecordWriter

from mmjax import cli
from mmjax.data.folder import CaptionFolderSource, load_image
from mmjax.data.records import WebDatasetSource, pack_record
from mmjax.errors import BadImageError, MMJaxError

FORMATS = ("folder", "webdataset")


def _encoded(kind: str, source: str, image_root: str | None) -> Iterator[tuple[bytes | None, str, str]]:
  """(encoded image, or None for an unreadable file; caption; name) per record."""
  if kind == "folder":
    folder = CaptionFolderSource(source, image_root=image_root)
    for i, caption in enumerate(folder.captions):
      path = folder.image_path(i)
      try:
        yield path.read_bytes(), caption, str(path)
      except OSError as e:
        yield None, caption, f"{path}: cannot read file ({e.strerror})"
  else:
    shards = WebDatasetSource(source)
    for i in range(len(shards)):
      yield shards.encoded(i)


def convert(kind: str, source: str, out: str, *, image_root: str | None = None,
            records_per_shard: int = 10_000, log=print) -> dict:
  """Writes `out/data-SSSSS-of-NNNNN.array_record`; returns counts of what was written.

  Shards are named once the number of readable records, and so of shards, is known.
  """
  if kind not in FORMATS:
    raise MMJaxError(f"--from={kind!r}: expected one of {FORMATS}")
  os.makedirs(out, exist_ok=True)
  written, skipped, paths, writer = 0, [], [], None
  for image, caption, name in _encoded(kind, source, image_root):
    if image is None:
      skipped.append(name)
      continue
    try:
      load_image(io.BytesIO(image), name)
    except BadImageError as e:
      skipped.append(str(e))
      continue
    if written % records_per_shard == 0:
      if writer is not None:
        writer.close()
      paths.append(os.path.join(out, f"data-{len(paths):05d}.array_record.partial"))
      writer = ArrayRecordWriter(paths[-1], "group_size:1")
    writer.write(pack_record(image, caption))
    written += 1
  if writer is not None:
    writer.close()
  for shard, path in enumerate(paths):
    os.replace(path, os.path.join(out, f"data-{shard:05d}-of-{len(paths):05d}.array_record"))
  for message in skipped[:5]:
    log(f"skipped: {message}")
  log(f"wrote {written} records in {len(paths)} shards to {out}; skipped {len(skipped)} unreadable images")
  return {"written": written, "skipped": len(skipped), "shards": len(paths)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m mmjax.data.write_records", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="kind", required=True, choices=FORMATS)
  parser.add_argument("--source", required=True, help="Caption file (folder) or tar shard glob (webdataset).")
  parser.add_argument("--out", required=True, help="Output directory for the array_record shards.")
  parser.add_argument("--image_root", default=None, help="Folder: base of relative image paths.")
  parser.add_argument("--records_per_shard", type=int, default=10_000)
  cli.add_verbose_flag(parser)
  args = parser.parse_args(argv)
  with cli.user_errors(args.verbose):
    convert(args.kind, args.source, args.out, image_root=args.image_root,
            records_per_shard=args.records_per_shard)


if __name__ == "__main__":
  main()
