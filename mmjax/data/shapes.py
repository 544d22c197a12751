"""Procedural image-caption data: coloured shapes on a dark, noisy background.

Every sample is a pure function of (seed, stream, index): its randomness comes
from `random.Random(f"{seed}:{stream}:{index}")` (stable across Python and numpy
versions, and far cheaper per call than numpy generators on tiny draws), and the
pixel noise is a random crop of a fixed noise texture. A fraction of colour x
shape combinations is held out of training; the eval sets below probe zero-shot
transfer to them, retrieval and attribute binding.
"""
import functools
import random
from typing import NamedTuple

import numpy as np

from mmjax.errors import ConfigError

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 220, 220),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES = ("small", "large")
# Object half-extent as a fraction of the image side, indexed like SIZES.
SIZE_FRACTIONS = (0.13, 0.18)
GRID = 3  # Objects sit in distinct cells of a GRID x GRID layout.
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
MAX_OBJECTS = 3
# Relative frequency of 1, 2, 3 objects per training image: half are single objects, whose
# captions isolate colour and shape; more objects teach relations and binding.
OBJECT_COUNT_WEIGHTS = (3, 2, 1)
BACKGROUND_MAX = 40  # Background channels are drawn from [0, BACKGROUND_MAX].
NOISE = 15  # Pixel noise is uniform in [0, NOISE].
COLOUR_JITTER = 12

CLASS_TEMPLATES = (
    "a {}",
    "a photo of a {}",
    "a large {}",
    "a small {}",
    "a {} at the center",
    "a photo of a small {}",
    "a photo of a large {}",
)

# Independent random streams per purpose, so eval sets never overlap training.
(_TRAIN, _ZEROSHOT, _RETRIEVAL, _BINDING, _HELD_OUT, _FEW_SHOT, _LABELLED, _ASPECT, _DENSE_TRAIN, _DENSE_TEST,
 _GROUNDING) = range(11)


class _Object(NamedTuple):
  colour: int
  shape: int
  large: bool
  cell: int  # Index into POSITIONS, row-major over the grid.


def class_name(colour: int, shape: int) -> str:
  return f"{COLOUR_NAMES[colour]} {SHAPES[shape]}"


def held_out_combos(seed: int, fraction: float) -> frozenset[tuple[str, str]]:
  """A deterministic set of (colour, shape) names kept out of training.

  At most ceil(k / #colours) combos per colour and ceil(k / #shapes) per shape
  are held out, so every colour and every shape still appears in training.
  """
  n_c, n_s = len(COLOUR_NAMES), len(SHAPES)
  k = int(round(fraction * n_c * n_s))
  cap_c, cap_s = -(-k // n_c), -(-k // n_s)
  if not 0 <= fraction < 1 or cap_c >= n_s or cap_s >= n_c:
    raise ConfigError(
        f"data.held_out_fraction={fraction}: expected a value in [0, 1) that "
        "leaves every colour and shape in some training combination.")
  combos = [(c, s) for c in range(n_c) for s in range(n_s)]
  _rng(seed, _HELD_OUT, 0).shuffle(combos)
  per_colour, per_shape, chosen = [0] * n_c, [0] * n_s, []
  for c, s in combos:
    if len(chosen) < k and per_colour[c] < cap_c and per_shape[s] < cap_s:
      per_colour[c] += 1
      per_shape[s] += 1
      chosen.append((COLOUR_NAMES[c], SHAPES[s]))
  return frozenset(chosen)


def _seen_combos(seed: int, fraction: float) -> list[tuple[int, int]]:
  """(colour, shape) indices of the combinations used for training."""
  held = held_out_combos(seed, fraction)
  return [(c, s) for c in range(len(COLOUR_NAMES)) for s in range(len(SHAPES))
          if (COLOUR_NAMES[c], SHAPES[s]) not in held]


def _rng(seed: int, stream: int, index: int) -> random.Random:
  return random.Random(f"{seed}:{stream}:{index}")


@functools.cache
def _mask(shape: int, radius: int) -> np.ndarray:
  """[2r+1, 2r+1, 1] uint8 hard mask of a shape, sampled at pixel centres."""
  t = np.arange(-radius, radius + 1) / (radius + 0.5)
  v, u = t[:, None], t[None, :]
  name = SHAPES[shape]
  if name == "circle":
    mask = u * u + v * v <= 1.0
  elif name == "square":
    mask = (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
  elif name == "triangle":  # Apex up, base at v = 0.8.
    mask = (v <= 0.8) & (np.abs(u) <= (v + 1.0) / 1.8)
  elif name == "star":  # Five points; radius oscillates between 0.4 and 1.
    spikes = ((1 + np.cos(5 * np.arctan2(u, -v))) / 2) ** 2
    mask = np.sqrt(u * u + v * v) <= 0.4 + 0.6 * spikes
  elif name == "cross":
    au, av = np.abs(u), np.abs(v)
    mask = ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
  else:  # diamond
    mask = np.abs(u) + np.abs(v) <= 1.0
  return mask[..., None].astype(np.uint8)


@functools.cache
def _noise_texture(size: int) -> np.ndarray:
  return np.random.default_rng(0).integers(0, NOISE + 1, (3 * size, 3 * size, 3), np.uint8)


def aspect_size(size: int, ratio: float) -> tuple[int, int]:
  """(height, width) of an image `ratio` times as wide as it is high, its shorter side `size`."""
  if ratio <= 0:
    raise ConfigError(f"aspect ratio {ratio}: must be positive (width / height)")
  return (size, round(size * ratio)) if ratio >= 1 else (round(size / ratio), size)


def _render(rng: random.Random, objects: list[_Object], size: int | tuple[int, int],
            labels: bool = False, boxes: list | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """The scene on a `size` x `size` (or (height, width)) canvas; objects scale with its shorter side.
  With `labels`, also each pixel's class: 0 for background, 1 + class id under an object. `boxes`, a
  list, receives each object's box (x0, y0, x1, y1) in fractions of the width and height."""
  h, w = (size, size) if isinstance(size, int) else size
  label_map = np.zeros((h, w), np.uint8) if labels else None
  texture = _noise_texture(max(h, w))
  y, x = rng.randrange(2 * max(h, w)), rng.randrange(2 * max(h, w))
  background = [rng.randint(0, BACKGROUND_MAX) for _ in range(3)]
  # Adding a length-3 vector per pixel is slow in numpy; add whole rows instead.
  image = (texture[y:y + h, x:x + w].reshape(h, 3 * w)
           + np.array(background * w, np.uint8)).reshape(h, w, 3)
  for obj in objects:
    radius = int(min(h, w) * SIZE_FRACTIONS[obj.large])
    side = 2 * radius + 1
    row, col = divmod(obj.cell, GRID)
    y0, x0 = _offset(rng, row, h, side), _offset(rng, col, w, side)
    colour = [min(max(ch + rng.randint(-COLOUR_JITTER, COLOUR_JITTER), 0), 255 - NOISE)
              for ch in COLOURS[COLOUR_NAMES[obj.colour]]]
    # uint8 arithmetic wraps, so this turns background + noise into colour + noise.
    delta = np.array([(c - b) % 256 for c, b in zip(colour, background)], np.uint8)
    mask = _mask(obj.shape, radius)
    image[y0:y0 + side, x0:x0 + side] += mask * delta
    if boxes is not None:
      boxes.append((x0 / w, y0 / h, (x0 + side) / w, (y0 + side) / h))
    if labels:
      label_map[y0:y0 + side, x0:x0 + side][mask[..., 0] > 0] = 1 + obj.colour * len(SHAPES) + obj.shape
  return (image, label_map) if labels else image


def _offset(rng: random.Random, cell: int, size: int, side: int) -> int:
  """Top/left pixel of an object of `side` pixels placed inside grid cell `cell`."""
  lo, hi = -(-cell * size // GRID), (cell + 1) * size // GRID
  return min(rng.randint(lo, max(lo, hi - side)), size - side)


def _relation(a: _Object, b: _Object, rng: random.Random) -> str:
  """A true spatial relation of `a` to `b` (they occupy different cells)."""
  (ra, ca), (rb, cb) = divmod(a.cell, GRID), divmod(b.cell, GRID)
  options = []
  if ca != cb:
    options.append("to the left of" if ca < cb else "to the right of")
  if ra != rb:
    options.append("above" if ra < rb else "below")
  return rng.choice(options)


def _phrase(obj: _Object, rng: random.Random, position_p: float) -> str:
  words = [class_name(obj.colour, obj.shape)]
  if rng.random() < 0.6:
    words.insert(0, SIZES[obj.large])
  if rng.random() < position_p:
    words.append(f"at the {POSITIONS[obj.cell]}")
  return " ".join(words)


def _caption(rng: random.Random, objects: list[_Object]) -> str:
  """One of several templates; the article is always "a" ("a orange ...") so that
  captions match CLASS_TEMPLATES filled with plain class names."""
  objs = rng.sample(objects, len(objects))
  template = rng.randrange(4)
  if len(objs) == 1:
    prefix = ("a", "a photo of a", "an image of a", "a")[template]
    return f"{prefix} {_phrase(objs[0], rng, 0.6)}"
  if template == 2:  # Relation between the first two objects, no positions.
    a, b = (_phrase(o, rng, 0.0) for o in objs[:2])
    text = f"a {a} {_relation(objs[0], objs[1], rng)} a {b}"
    return text + (f", and a {_phrase(objs[2], rng, 0.5)}" if len(objs) == 3 else "")
  phrases = [f"a {_phrase(o, rng, 0.4)}" for o in objs]
  listing = ", ".join(phrases[:-1]) + f" and {phrases[-1]}"
  count = ("two", "three")[len(objs) - 2]
  return {0: "", 1: "a photo of ", 3: f"{count} objects: "}[template] + listing


def _scene(rng: random.Random, combos: list[tuple[int, int]], n: int) -> list[_Object]:
  """`n` objects with distinct combos from `combos`, in distinct grid cells."""
  picks = rng.sample(combos, n)
  cells = rng.sample(range(GRID * GRID), n)
  return [_Object(c, s, rng.random() < 0.5, p) for (c, s), p in zip(picks, cells)]


def _object_count(rng: random.Random) -> int:
  return rng.choices(range(1, MAX_OBJECTS + 1), weights=OBJECT_COUNT_WEIGHTS)[0]


def _sample(rng: random.Random, combos: list[tuple[int, int]], size: int | tuple[int, int],
            regions: bool = False) -> dict:
  objects = _scene(rng, combos, _object_count(rng))
  boxes = [] if regions else None
  sample = dict(image=_render(rng, objects, size, boxes=boxes), caption=_caption(rng, objects))
  if regions:
    sample["regions"] = _regions(objects, boxes)
  return sample


def referring_text(obj: _Object) -> str:
  """The referring expression of an object, unique in its scene (whose objects' classes differ)."""
  return f"the {class_name(obj.colour, obj.shape)}"


def _regions(objects: list[_Object], boxes: list) -> list[dict]:
  return [dict(text=referring_text(obj), box=box) for obj, box in zip(objects, boxes)]


def _other_shapes(objects: list[_Object], rng: random.Random, seen: set) -> list[_Object]:
  """The same scene with shapes changed: permuted among the objects when that keeps every
  combination seen and distinct (which swaps colour-shape bindings), else one object
  gets another seen shape of its colour."""
  shapes = [o.shape for o in objects]
  for _ in range(8 if len(set(shapes)) > 1 else 0):
    perm = rng.sample(shapes, len(shapes))
    combos = [(o.colour, s) for o, s in zip(objects, perm)]
    if perm != shapes and all(c in seen for c in combos) and len(set(combos)) == len(combos):
      return [o._replace(shape=s) for o, s in zip(objects, perm)]
  i = rng.randrange(len(objects))
  taken = {(o.colour, o.shape) for o in objects}
  choices = [s for s in range(len(SHAPES)) if (objects[i].colour, s) in seen - taken]
  out = list(objects)
  out[i] = objects[i]._replace(shape=rng.choice(choices))
  return out


def _twins(rng: random.Random, combos: list[tuple[int, int]], size: int | tuple[int, int],
           regions: bool = False) -> list[dict]:
  """Two samples identical in layout, colours, sizes, noise and caption wording, differing
  only in shapes: a negative that colour and position alone cannot tell apart."""
  objects = _scene(rng, combos, _object_count(rng))
  twin = _other_shapes(objects, rng, set(combos))
  state = rng.getstate()
  out = []
  for objs in (objects, twin):
    rng.setstate(state)
    boxes = [] if regions else None
    out.append(dict(image=_render(rng, objs, size, boxes=boxes), caption=_caption(rng, objs)))
    if regions:
      out[-1]["regions"] = _regions(objs, boxes)
  return out


class ShapesSource:
  """Grain random-access source of dict(image=uint8 [S, S, 3], caption=str).

  With `twins=True` each record is a list of two such samples that differ only in their
  shapes (`group_size = 2`); the pipeline keeps them in one batch, so the contrastive
  loss cannot be solved from colours and positions alone. With `aspect_ratios` (width / height)
  each record's images are that much wider than high (`aspect_size`), its ratio drawn per record.
  With `regions`, each sample also has `regions`: every object's referring expression ("the red
  circle") and box (`mmjax.data.locca`), from the same draws, so the scenes stay those without.
  """

  def __init__(self, seed: int = 0, image_size: int = 64, held_out_fraction: float = 0.2,
               num_records: int = 1_000_000, twins: bool = False, aspect_ratios: tuple[float, ...] = (),
               regions: bool = False):
    self.seed, self.image_size, self.num_records = seed, image_size, num_records
    self.held_out_fraction, self.twins, self.regions = held_out_fraction, twins, regions
    self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
    for ratio in self.aspect_ratios:
      aspect_size(image_size, ratio)
    self.group_size = 2 if twins else 1
    self._combos = _seen_combos(seed, held_out_fraction)

  def __len__(self) -> int:
    return self.num_records // self.group_size

  def __getitem__(self, index: int) -> dict | list[dict]:
    rng = _rng(self.seed, _TRAIN, index)
    size = self.image_size
    if self.aspect_ratios:  # From its own stream, so the scenes are those of square training.
      size = aspect_size(size, _rng(self.seed, _ASPECT, index).choice(self.aspect_ratios))
    if self.twins:
      return _twins(rng, self._combos, size, self.regions)
    return _sample(rng, self._combos, size, self.regions)

  def __repr__(self) -> str:  # Grain validates restored iterator state against it.
    aspect = f", aspect_ratios={self.aspect_ratios}" if self.aspect_ratios else ""
    regions = ", regions=True" if self.regions else ""
    return (f"ShapesSource(seed={self.seed}, image_size={self.image_size}, "
            f"held_out_fraction={self.held_out_fraction}, num_records={self.num_records}, "
            f"twins={self.twins}{aspect}{regions})")


class ShapesLabelSource:
  """Grain random-access source of dict(image=uint8 [S, S, 3], label=int32) for supervised
  classification: one object per image, its class (colour * len(SHAPES) + shape) drawn uniformly
  over all 48 classes. Evaluate on `class_images`, drawn from another stream."""

  def __init__(self, seed: int = 0, image_size: int = 64, num_records: int = 1_000_000):
    self.seed, self.image_size, self.num_records = seed, image_size, num_records

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict:
    rng = _rng(self.seed, _LABELLED, index)
    label = rng.randrange(len(CLASSES))
    image = _render(rng, _scene(rng, [CLASSES[label]], 1), self.image_size)
    return dict(image=image, label=np.int32(label))

  def __repr__(self) -> str:
    return f"ShapesLabelSource(seed={self.seed}, image_size={self.image_size}, num_records={self.num_records})"


def duplicate_rate(captions: list[str]) -> float:
  """Fraction of captions that repeat an earlier caption in the list."""
  return 1.0 - len(set(captions)) / len(captions)


CLASSES = [(c, s) for c in range(len(COLOUR_NAMES)) for s in range(len(SHAPES))]
CLASS_NAMES = [class_name(c, s) for c, s in CLASSES]


def class_images(classes, per_class: int, seed: int = 0, image_size: int = 64, few_shot: bool = False,
                 draw: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """`(images uint8 [N, S, S, 3] (image_size (h, w): [N, h, w, 3]), labels int32 [N])`: `per_class`
  single-object images of each class id in `classes` (class c = colour * len(SHAPES) + shape). The
  zero-shot stream serves evaluation; `few_shot=True` draws training shots from another stream,
  `draw` picking the draw (k-shot experiments repeat over draws)."""
  stream, offset = (_FEW_SHOT, draw * len(CLASSES) * per_class) if few_shot else (_ZEROSHOT, 0)
  images, labels = [], []
  for label in classes:
    for i in range(per_class):
      rng = _rng(seed, stream, offset + label * per_class + i)
      images.append(_render(rng, _scene(rng, [CLASSES[label]], 1), image_size))
      labels.append(label)
  return np.stack(images), np.array(labels, np.int32)


def zeroshot_set(seed: int = 0, image_size: int = 64, per_class: int = 10,
                 held_out_fraction: float = 0.2) -> dict:
  """Single-object images, one class per colour x shape combination.

  Returns dict(images uint8 [N, S, S, 3], labels int32 [N], class_names [C],
  seen bool [C]); class c = colour * len(SHAPES) + shape.
  """
  held = held_out_combos(seed, held_out_fraction)
  images, labels = class_images(range(len(CLASSES)), per_class, seed, image_size)
  return dict(images=images, labels=labels, class_names=list(CLASS_NAMES),
              seen=np.array([(COLOUR_NAMES[c], SHAPES[s]) not in held for c, s in CLASSES]))


def retrieval_set(seed: int = 0, image_size: int = 64, n: int = 512,
                  held_out_fraction: float = 0.2) -> dict:
  """Training-distribution pairs from a separate random stream: dict(images, captions)."""
  combos = _seen_combos(seed, held_out_fraction)
  samples = [_sample(_rng(seed, _RETRIEVAL, i), combos, image_size) for i in range(n)]
  return dict(images=np.stack([s["image"] for s in samples]),
              captions=[s["caption"] for s in samples])


def dense_set(seed: int = 0, image_size: int = 64, n: int = 128, split: str = "test") -> dict:
  """Scenes of 1 to 3 objects of any of the 48 classes with each pixel's class, for dense probes:
  dict(images uint8 [N, S, S, 3], labels uint8 [N, S, S]: 0 for background, 1 + class id (colour *
  len(SHAPES) + shape) under an object). "train" and "test" draw from streams of their own."""
  streams = {"train": _DENSE_TRAIN, "test": _DENSE_TEST}
  if split not in streams:
    raise ConfigError(f"dense_set split={split!r}; expected one of {sorted(streams)}")
  images, labels = [], []
  for i in range(n):
    rng = _rng(seed, streams[split], i)
    image, label = _render(rng, _scene(rng, CLASSES, _object_count(rng)), image_size, labels=True)
    images.append(image)
    labels.append(label)
  return dict(images=np.stack(images), labels=np.stack(labels))


def grounding_set(seed: int = 0, image_size: int = 64, n: int = 128, held_out_fraction: float = 0.2) -> dict:
  """Training-distribution scenes (1 to 3 objects of the seen classes) from a stream of their own, each
  with one of its objects to find: dict(images uint8 [N, S, S, 3], texts [N] ("the red circle", unique
  in its scene), boxes float64 [N, 4] (x0, y0, x1, y1 in fractions of the side))."""
  combos = _seen_combos(seed, held_out_fraction)
  images, texts, boxes = [], [], []
  for i in range(n):
    rng = _rng(seed, _GROUNDING, i)
    objects, scene_boxes = _scene(rng, combos, _object_count(rng)), []
    images.append(_render(rng, objects, image_size, boxes=scene_boxes))
    pick = rng.randrange(len(objects))
    texts.append(referring_text(objects[pick]))
    boxes.append(scene_boxes[pick])
  return dict(images=np.stack(images), texts=texts, boxes=np.array(boxes, np.float64))


def binding_set(seed: int = 0, image_size: int = 64, n: int = 256,
                held_out_fraction: float = 0.2) -> dict:
  """Two objects with different colours and shapes (both seen combos).

  Returns dict(images, true_captions, swapped_captions) where the swapped caption
  exchanges the two colours: "a red circle and a blue square" vs
  "a blue circle and a red square".
  """
  combos = _seen_combos(seed, held_out_fraction)
  images, true, swapped = [], [], []
  for i in range(n):
    rng = _rng(seed, _BINDING, i)
    while True:
      a, b = _scene(rng, combos, 2)
      if a.colour != b.colour and a.shape != b.shape:
        break
    images.append(_render(rng, [a, b], image_size))
    true.append(f"a {class_name(a.colour, a.shape)} and a {class_name(b.colour, b.shape)}")
    swapped.append(f"a {class_name(b.colour, a.shape)} and a {class_name(a.colour, b.shape)}")
  return dict(images=np.stack(images), true_captions=true, swapped_captions=swapped)
