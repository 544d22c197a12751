"""Image files on disk: captioned images (JSONL / CSV) and class folders.

Both sources return None for an unreadable image when `on_bad_image="skip"`; the
trainer's loader reads them through `read` instead, which names the file, puts a
readable record in its place and reports it with the batch (`mmjax.data.pipeline`),
so nothing is skipped without a name.
"""
import csv
import json
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from mmjax.data.locca import check_box
from mmjax.data.tokenizer_base import check_text
from mmjax.errors import BadImageError, ConfigError, DataError

MIN_SIDE = 8  # Smaller images are placeholders (web crawls serve 1x1 pixels).
MAX_PIXELS = 1 << 26  # Decompression-bomb guard, checked before decoding.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BAD_IMAGE_POLICIES = ("skip", "raise")
# Accepted (image, caption) column pairs of a CSV caption file.
CSV_COLUMNS = (("image", "caption"), ("filepath", "title"))


def load_image(path: str | os.PathLike | BinaryIO, name: str | None = None) -> np.ndarray:
  """Decodes an image file (a path, or an open binary file called `name` in errors) to uint8
  RGB [H, W, 3]; transparency is composited on white.

  Raises BadImageError naming the file for missing, corrupt, truncated, tiny or
  oversized images.
  """
  label = path if name is None else name
  try:
    with Image.open(path) as image:
      w, h = image.size
      if w * h > MAX_PIXELS:
        raise BadImageError(f"{label}: {w}x{h} image exceeds MAX_PIXELS={MAX_PIXELS}")
      if min(w, h) < MIN_SIDE:
        raise BadImageError(f"{label}: {w}x{h} image is smaller than MIN_SIDE={MIN_SIDE}")
      return to_rgb(image)
  except BadImageError:
    raise
  except FileNotFoundError as e:
    raise BadImageError(f"{label}: file not found") from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadImageError(f"{label}: cannot decode image ({type(e).__name__}: {e})") from e


def to_rgb(image: Image.Image) -> np.ndarray:
  """A PIL image as uint8 RGB [H, W, 3], transparency composited on white (as every loader reads files)."""
  if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
    image = image.convert("RGBA")
    image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
  return np.asarray(image.convert("RGB"))


def check_policy(on_bad_image: str) -> None:
  if on_bad_image not in BAD_IMAGE_POLICIES:
    raise ConfigError(
        f"data.on_bad_image={on_bad_image!r}: expected one of {BAD_IMAGE_POLICIES}")


class SkipsBadImages:
  """A source of records with one image each: `read(index)` decodes record `index` or raises
  BadImageError naming its file, `record_name(index)` names that file, and `source[index]`
  is `read(index)`, or None for an unreadable image under `on_bad_image="skip"`."""
  on_bad_image: str

  def __getitem__(self, index: int) -> dict | None:
    try:
      return self.read(index)
    except BadImageError:
      if self.on_bad_image == "raise":
        raise
      return None


class _ImageFiles(SkipsBadImages):
  """Image files `self._paths`, one a record."""
  _paths: list[Path]

  def __len__(self) -> int:
    return len(self._paths)

  def image_path(self, index: int) -> Path:
    return self._paths[index]

  def record_name(self, index: int) -> str:
    return str(self._paths[index])


class CaptionFolderSource(_ImageFiles):
  """Grain random-access source of dict(image=uint8 [H, W, 3], caption=str) or None.

  `captions_path` is JSONL ({"image": path, "caption": text} per line) or CSV / TSV (by its
  suffix) with the columns `csv_image_key` and `csv_caption_key`, by default image,caption or
  filepath,title, separated by `csv_separator` (default "," for .csv, a tab for .tsv). Relative
  image paths are resolved against `image_root` (default: the caption file's directory).

  With `regions` (LocCa's grounding targets, `mmjax.data.locca`), each record also has `regions`,
  read from a JSONL line's optional "regions": [{"text": "the red mug", "box": [x0, y0, x1, y1]}, ...],
  the box in pixels of the image file; a line without it has none.
  """

  def __init__(self, captions_path: str | os.PathLike, image_root: str | os.PathLike | None = None,
               on_bad_image: str = "skip", csv_image_key: str = "", csv_caption_key: str = "",
               csv_separator: str = "", regions: bool = False):
    check_policy(on_bad_image)
    self.captions_path, self.on_bad_image = Path(captions_path), on_bad_image
    root = Path(image_root) if image_root is not None else self.captions_path.parent
    if bool(csv_image_key) != bool(csv_caption_key):
      raise ConfigError("data.csv_image_key and data.csv_caption_key: set both or neither, got "
                        f"{csv_image_key!r} and {csv_caption_key!r}")
    if len(csv_separator) > 1:
      raise ConfigError(f"data.csv_separator={csv_separator!r}: expected one character")
    if self.captions_path.suffix.lower() in (".csv", ".tsv"):
      columns = ((csv_image_key, csv_caption_key),) if csv_image_key else CSV_COLUMNS
      separator = csv_separator or ("\t" if self.captions_path.suffix.lower() == ".tsv" else ",")
      reader = lambda path: _read_csv(path, columns, separator)
    else:
      reader = _read_jsonl
    try:
      pairs = list(reader(self.captions_path))
    except (OSError, UnicodeDecodeError) as e:
      raise DataError(f"{self.captions_path}: cannot read caption file ({e})") from e
    if not pairs:
      raise DataError(f"{self.captions_path}: caption file has no records")
    self._paths = [root / image for image, _ in pairs]
    self.captions = [caption for _, caption in pairs]
    self.regions = _read_regions(self.captions_path) if regions else None

  def read(self, index: int) -> dict:
    record = dict(image=load_image(self._paths[index]), caption=self.captions[index])
    if self.regions is not None:
      h, w = record["image"].shape[:2]
      record["regions"] = [dict(text=text, box=(x0 / w, y0 / h, x1 / w, y1 / h))
                           for text, (x0, y0, x1, y1) in self.regions[index]]
    return record

  def __repr__(self) -> str:  # Grain validates restored iterator state against it.
    return f"CaptionFolderSource({str(self.captions_path)!r}, records={len(self)})"


def _read_jsonl(path: Path, key: str = "caption", types: tuple[type, ...] = (str,)):
  """(image, record[key]) of each line's object; `key` must hold one of `types`."""
  with path.open(encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
      if not (isinstance(record, dict) and isinstance(record.get("image"), str)
              and isinstance(record.get(key), types) and not isinstance(record.get(key), bool)):
        raise DataError(
            f'{path}:{lineno}: expected an object with string "image" and {key!r}, got {line[:80]!r}')
      value = record[key]
      yield record["image"], (check_text(value, f"{path}:{lineno}: {key}") if key == "caption" else value)


def _read_regions(path: Path) -> list[list[tuple[str, tuple[float, ...]]]]:
  """Each JSONL line's "regions" as (text, pixel box) pairs, in the order `_read_jsonl` reads the lines."""
  if path.suffix.lower() in (".csv", ".tsv"):
    raise ConfigError(f"{path}: region boxes (LocCa, loss.decoder_weight) are read from a JSONL caption file's "
                      '"regions" field; a CSV file has none')
  out = []
  with path.open(encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      regions = json.loads(line).get("regions", [])
      where = f"{path}:{lineno}: regions"
      if not isinstance(regions, list) or not all(isinstance(r, dict) and isinstance(r.get("text"), str)
                                                  for r in regions):
        raise DataError(f'{where}: expected a list of {{"text": str, "box": [x0, y0, x1, y1]}}, got {regions!r:.80}')
      out.append([(check_text(r["text"], where), check_box(r.get("box"), where)) for r in regions])
  return out


def _read_csv(path: Path, accepted: tuple[tuple[str, str], ...], separator: str):
  with path.open(encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f, delimiter=separator)
    header = reader.fieldnames or []
    columns = next((c for c in accepted if set(c) <= set(header)), None)
    if columns is None:
      raise DataError(f"{path}:1: header {header} (separator {separator!r}) lacks the columns of any of "
                      f"{accepted}; set data.csv_image_key, data.csv_caption_key and data.csv_separator")
    for row in reader:
      image, caption = (row[c] for c in columns)
      if not image or caption is None or None in row:
        raise DataError(f"{path}:{reader.line_num}: expected {len(header)} fields with a "
                        f"non-empty {columns[0]!r}, got {row}")
      yield image, caption


class _LabelledFiles(_ImageFiles):
  """Image files `self._paths` with their class indices `self._labels`."""
  _labels: list[int]

  @property
  def labels(self) -> list[int]:
    return self._labels

  def read(self, index: int) -> dict:
    return dict(image=load_image(self._paths[index]), label=self._labels[index])


class ImageFolderSource(_LabelledFiles):
  """Grain random-access source of dict(image, label=int) or None, from root/<class>/<file>.

  Classes are the sorted subdirectory names (`class_names`); files with an
  extension outside IMAGE_EXTENSIONS are ignored.
  """

  def __init__(self, root: str | os.PathLike, on_bad_image: str = "skip"):
    check_policy(on_bad_image)
    self.root, self.on_bad_image = Path(root), on_bad_image
    if not self.root.is_dir():
      raise DataError(f"{self.root}: image folder does not exist")
    self.class_names = sorted(d.name for d in self.root.iterdir() if d.is_dir())
    self._paths, self._labels = [], []
    for label, name in enumerate(self.class_names):
      for file in sorted((self.root / name).rglob("*")):
        if file.suffix.lower() in IMAGE_EXTENSIONS:
          self._paths.append(file)
          self._labels.append(label)
    if not self._paths:
      raise DataError(f"{self.root}: expected class subdirectories holding {IMAGE_EXTENSIONS} files")

  def __repr__(self) -> str:
    return f"ImageFolderSource({str(self.root)!r}, records={len(self)})"


class LabelledImageSource(_LabelledFiles):
  """Source of dict(image, label=int) or None from a JSONL ({"image": path, "label": ...} per line) or
  CSV / TSV (columns image,label) file; relative paths are resolved against its directory.

  A label is a class name or an index into `class_names`. Without `class_names` the classes are the
  sorted distinct labels, which must then be names."""

  def __init__(self, path: str | os.PathLike, class_names: list[str] | None = None, on_bad_image: str = "skip"):
    check_policy(on_bad_image)
    self.path, self.on_bad_image = Path(path), on_bad_image
    if self.path.suffix.lower() in (".csv", ".tsv"):
      rows = list(_read_csv(self.path, (("image", "label"),), "\t" if self.path.suffix.lower() == ".tsv" else ","))
    else:
      rows = list(_read_jsonl(self.path, "label", (str, int)))
    if not rows:
      raise DataError(f"{self.path}: no labelled images")
    as_index = [int(label) if isinstance(label, int) or label.strip().isdigit() else None for _, label in rows]
    if class_names is None and any(i is not None for i in as_index):
      raise DataError(f"{self.path}: labels are class indices; give the class names (--classes)")
    self.class_names = list(class_names) if class_names is not None else sorted({label for _, label in rows})
    lookup = {name: i for i, name in enumerate(self.class_names)}
    self._paths, self._labels = [], []
    for n, ((image, label), index) in enumerate(zip(rows, as_index)):
      index = lookup.get(label) if index is None else index
      if index is None or not 0 <= index < len(self.class_names):
        raise DataError(f"{self.path}: record {n + 1} has label {label!r}, not one of the "
                        f"{len(self.class_names)} classes (a name or an index)")
      self._paths.append(self.path.parent / image)
      self._labels.append(index)

  def __repr__(self) -> str:
    return f"LabelledImageSource({str(self.path)!r}, records={len(self)})"
