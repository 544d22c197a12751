"""Caption retrieval sets in Karpathy's split files (`dataset_coco.json`, `dataset_flickr30k.json`):
{"images": [{"filename", "filepath" (COCO only), "split", "sentences": [{"raw": ...}, ...]}, ...]}."""
from __future__ import annotations

import json
import os
from typing import NamedTuple

from mmjax.errors import DataError


class RetrievalSet(NamedTuple):
  image_paths: list[str]
  captions: list[str]
  caption_image: list[int]  # The index in image_paths of each caption's image.


def read(path: str, image_root: str | None = None, split: str = "test") -> RetrievalSet:
  """The `split` images of a Karpathy file with every one of their sentences; image paths are
  `image_root/[filepath/]filename` (`image_root` defaults to the file's directory)."""
  try:
    with open(path, encoding="utf-8") as f:
      images = json.load(f)["images"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: not a Karpathy split file with an 'images' list ({e})") from e
  root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
  paths, captions, owners = [], [], []
  for n, image in enumerate(images):
    if not isinstance(image, dict) or "filename" not in image or "sentences" not in image:
      raise DataError(f"{path}: images[{n}] lacks 'filename' or 'sentences'")
    if image.get("split") != split:
      continue
    sentences = [s["raw"].strip() for s in image["sentences"] if isinstance(s, dict) and s.get("raw", "").strip()]
    if not sentences:
      raise DataError(f"{path}: images[{n}] ({image['filename']}) has no sentence with a 'raw' text")
    owners.extend([len(paths)] * len(sentences))
    captions.extend(sentences)
    paths.append(os.path.join(root, image.get("filepath", ""), image["filename"]))
  if not paths:
    splits = sorted({str(image.get("split")) for image in images if isinstance(image, dict)})
    raise DataError(f"{path}: no image in split {split!r}; its splits are {splits}")
  return RetrievalSet(paths, captions, owners)
