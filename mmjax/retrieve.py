"""Build an embedding index with a two-tower export, and query it with texts or images.

  python -m mmjax.retrieve build --export runs/siglip_shapes_export --out runs/index_images \
      --modality image --shapes 2048                        # or --captions FILE [--image_root DIR]
  python -m mmjax.retrieve query --export runs/siglip_shapes_export --index runs/index_images \
      --text "a large red circle" --text "a small blue star" --k 5      # or --image PATH

`build` embeds the images (or, `--modality text`, the captions) of a caption file (JSONL or CSV,
as `data.captions`; unreadable images are skipped and counted) or of N procedural shapes scenes,
and saves the index; an image's item is its path (`shapes:<i>` for the scenes), a text's is the
text. Identical captions become one row that keeps the records it came from, so a query never
gets the same caption twice. `query` embeds each query with the matching tower and prints the k
nearest items with the records they stand for.
"""
from __future__ import annotations

import time

from absl import app, flags

from mmjax import bundle, cli, runtime
from mmjax.data import shapes
from mmjax.data.folder import CaptionFolderSource, load_image
from mmjax.errors import ConfigError
from mmjax.index import MODALITIES, EmbeddingIndex

COMMANDS = ("build", "query")


def build(export: str, out: str, modality: str, captions: str | None = None, image_root: str | None = None,
          num_shapes: int = 0, seed: int = 0) -> tuple[EmbeddingIndex, int]:
  """`(index, skipped images)` of the captions file's (or the shapes scenes') images or texts, saved at `out`."""
  if modality not in MODALITIES:
    raise ConfigError(f"--modality={modality!r}: expected one of {MODALITIES}")
  if bool(captions) == bool(num_shapes):
    raise ConfigError("give exactly one of --captions FILE and --shapes N")
  encoder = bundle.load(export)
  skipped = 0
  if num_shapes:
    data = shapes.retrieval_set(seed, encoder.image_size, num_shapes)
    images, texts = list(data["images"]), data["captions"]
    image_items = [f"shapes:{i}" for i in range(num_shapes)]
  else:
    source = CaptionFolderSource(captions, image_root, on_bad_image="skip")
    texts = source.captions
    images, image_items = [], []
    if modality == "image":
      for i in range(len(source)):
        record = source[i]
        if record is None:
          skipped += 1
          continue
        images.append(record["image"])
        image_items.append(str(source.image_path(i)))
  if modality == "image":
    index = EmbeddingIndex(encoder.encode_image(images), image_items, "image")
  else:
    owners: dict[str, list[int]] = {}
    for record, text in enumerate(texts):
      owners.setdefault(text, []).append(record)
    index = EmbeddingIndex(encoder.encode_text(list(owners)), list(owners), "text", list(owners.values()))
  index.save(out)
  return index, skipped


def query(export: str, index_dir: str, texts=(), image_paths=(), k: int = 5) -> list[tuple[str, list]]:
  """`[(query, [(cosine, item, records), ...]), ...]` for each text and image query; `records` are
  the rows of the caption file (or scenes) the item stands for."""
  if not texts and not image_paths:
    raise ConfigError("give at least one --text or --image query")
  index = EmbeddingIndex.load(index_dir)
  encoder = bundle.load(export)
  hits = []
  if texts:
    hits += zip(texts, index.search(encoder.encode_text(list(texts)), k))
  if image_paths:
    hits += zip(image_paths, index.search(encoder.encode_image([load_image(p) for p in image_paths]), k))
  return [(q, [(score, item, index.owners_of(row)) for score, row, item in found]) for q, found in hits]


def main(argv):
  runtime.quiet_logs()
  f = flags.FLAGS
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m mmjax.retrieve {{{'|'.join(COMMANDS)}}} [flags]")
  if argv[1] == "build":
    start = time.time()
    index, skipped = build(f.export, f.out, f.modality, f.captions, f.image_root, f.shapes, f.seed)
    merged = sum(len(o) - 1 for o in index.owners or [])
    print(f"indexed {len(index.items)} {index.modality} rows (dim {index.embeddings.shape[1]}) in "
          f"{time.time() - start:.1f} s -> {f.out}" + (f"; skipped {skipped} unreadable images" if skipped else "")
          + (f"; {merged} duplicate captions merged into the rows they repeat" if merged else ""))
    return
  for text, hits in query(f.export, f.index, f.text or (), f.image or (), f.k):
    print(f"{text}")
    for rank, (score, item, records) in enumerate(hits, 1):
      print(f"  {rank:>2}  {score:.4f}  {item}  (record{'s' if len(records) > 1 else ''} "
            f"{', '.join(map(str, records))})")


if __name__ == "__main__":
  flags.DEFINE_string("export", None, "Two-tower export directory (python -m mmjax.export).", required=True)
  flags.DEFINE_string("out", None, "build: index directory to write.")
  flags.DEFINE_enum("modality", "image", MODALITIES, "build: index the images or the captions.")
  flags.DEFINE_string("captions", None, "build: JSONL or CSV caption file.")
  flags.DEFINE_string("image_root", None, "build: root of relative image paths (default: the caption file's dir).")
  flags.DEFINE_integer("shapes", 0, "build: index N procedural shapes scenes instead of a caption file.")
  flags.DEFINE_integer("seed", 0, "build: seed of the shapes scenes.")
  flags.DEFINE_string("index", None, "query: index directory.")
  flags.DEFINE_multi_string("text", None, "query: a text query (repeatable).")
  flags.DEFINE_multi_string("image", None, "query: an image file query (repeatable).")
  flags.DEFINE_integer("k", 5, "query: results per query.")
  cli.run(main)
