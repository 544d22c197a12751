"""LocCa's decoder targets (SigLIP 2's captioning loss): three tasks per image, packed in one row.

A record with `caption` (str) and `regions` (a list of dict(text=str, box=(x0, y0, x1, y1)), the box
in fractions of the image's width and height) becomes three token sequences, one per task, packed
one after another into `locca` int32 [max_len], with `locca_segments` int32 [max_len] (1, 2, 3: the
task of each token; 0: padding) and `locca_weights` float32 [max_len], 1 where a token is a target
(predicted from the tokens of its sequence before it):

  caption      [CAP]  caption ids  EOS                weights on the caption and EOS
  referring    [REF]  region text  EOS  x0 y0 x1 y1   weights on the four box tokens
  grounded     [GCAP] x0 y0 x1 y1  region text  EOS   weights on the text and EOS

The caption takes the room the other two leave. The decoder's vocabulary is the text tokenizer's,
then the three task tokens, then `box_bins` box coordinate tokens (coordinate v in [0, 1] is bin
min(floor(v * bins), bins - 1)). A record without regions trains the caption alone.
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np

from mmjax.errors import ConfigError, DataError

TASKS = ("caption", "referring", "grounded")
BOX_TOKENS = 4
MIN_LEN = 32  # Room for a caption word beside two sequences of up to max_len // 4 region text tokens.


@dataclasses.dataclass(frozen=True)
class LocCaVocab:
  """The decoder's token ids: the text vocabulary's, then the task tokens, then the box bins."""
  text_vocab: int
  box_bins: int

  def __post_init__(self):
    if self.box_bins < 2:
      raise ConfigError(f"model.locca.box_bins={self.box_bins}: need at least 2 coordinate bins")

  @property
  def size(self) -> int:
    return self.text_vocab + len(TASKS) + self.box_bins

  def task(self, name: str) -> int:
    return self.text_vocab + TASKS.index(name)

  @property
  def first_bin(self) -> int:
    return self.text_vocab + len(TASKS)

  def box_tokens(self, box) -> list[int]:
    bins = np.clip(np.floor(np.asarray(box, np.float64) * self.box_bins), 0, self.box_bins - 1).astype(int)
    return [self.first_bin + int(b) for b in bins]

  def box_of_bins(self, bins) -> np.ndarray:
    """Box fractions [..., 4] of coordinate bins [..., 4] (0..box_bins-1): each bin's centre."""
    return (np.asarray(bins, np.float64) + 0.5) / self.box_bins


def text_ids(tokenizer, text: str, max_ids: int) -> list[int]:
  """The tokenizer's ids of `text` without EOS or padding, at most `max_ids` of them."""
  row = [int(i) for i in tokenizer.encode(text, max_ids + 1)]
  return row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row


def check_box(box, where: str) -> tuple[float, ...]:
  """`box` as four floats x0 < x1, y0 < y1; DataError naming `where` otherwise."""
  try:
    x0, y0, x1, y1 = (float(v) for v in box)
  except (TypeError, ValueError):
    raise DataError(f"{where}: a box is four numbers [x0, y0, x1, y1], got {box!r}") from None
  if not (x0 < x1 and y0 < y1):
    raise DataError(f"{where}: box {box!r} needs x0 < x1 and y0 < y1")
  return x0, y0, x1, y1


def square_crop_regions(regions: list[dict], height: int, width: int) -> list[dict]:
  """`regions` of an image as its centre square crop (`ResizeImage`) shows them: boxes re-expressed
  in the crop's fractions and clipped to it; a region with less than half its box inside is dropped."""
  if height == width:
    return regions
  keep = min(height, width) / max(height, width)
  lo, axis = (1 - keep) / 2, (0, 2) if width > height else (1, 3)
  out = []
  for region in regions:
    box = list(region["box"])
    area = (box[2] - box[0]) * (box[3] - box[1])
    for i in axis:
      box[i] = min(max((box[i] - lo) / keep, 0.0), 1.0)
    visible = (box[2] - box[0]) * (box[3] - box[1]) * keep  # In the whole image's fractions.
    if visible >= 0.5 * area:
      out.append(dict(region, box=tuple(box)))
  return out


@dataclasses.dataclass
class LocCaTargets(grain.transforms.RandomMap):
  """Adds `locca`, `locca_segments` and `locca_weights` (module doc) from `caption` and `regions`, which
  it removes; the referring and grounded sequences each take a region drawn at random. `square_crop`: the
  image will be centre-cropped to a square (a fixed-resolution tower), so the boxes follow the crop."""
  tokenizer: object
  vocab: LocCaVocab
  max_len: int
  square_crop: bool = False

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    element = dict(element)
    regions = element.pop("regions", [])
    if self.square_crop:
      regions = square_crop_regions(regions, *element["image"].shape[:2])
    v, eos, text_room = self.vocab, self.tokenizer.eos_id, self.max_len // 4
    grounding = []  # (task, prompt, target) of the referring and grounded sequences.
    for task in TASKS[1:] if regions else ():
      region = regions[int(rng.integers(len(regions)))]
      text, box = text_ids(self.tokenizer, region["text"], text_room) + [eos], v.box_tokens(region["box"])
      grounding.append((task, text, box) if task == "referring" else (task, box, text))
    room = self.max_len - sum(1 + len(prompt) + len(target) for _, prompt, target in grounding) - 2
    sequences = [("caption", [], text_ids(self.tokenizer, element["caption"], room) + [eos]), *grounding]
    tokens, segments = np.zeros(self.max_len, np.int32), np.zeros(self.max_len, np.int32)
    weights, start = np.zeros(self.max_len, np.float32), 0
    for task, prompt, target in sequences:
      row = [v.task(task)] + prompt + target
      tokens[start:start + len(row)] = row
      segments[start:start + len(row)] = 1 + TASKS.index(task)
      weights[start + 1 + len(prompt):start + len(row)] = 1.0
      start += len(row)
    return element | dict(locca=tokens, locca_segments=segments, locca_weights=weights)


def referring_prompts(tokenizer, vocab: LocCaVocab, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """`(tokens int32 [N, max_len], last int32 [N])`: [REF] text EOS for each of `texts`, and the index of
  each prompt's last token, after which the decoder writes the box."""
  tokens = np.zeros((len(texts), max_len), np.int32)
  last = np.zeros(len(texts), np.int32)
  for i, text in enumerate(texts):
    prompt = [vocab.task("referring")] + text_ids(tokenizer, text, max_len // 4) + [tokenizer.eos_id]
    tokens[i, :len(prompt)] = prompt
    last[i] = len(prompt) - 1
  return tokens, last
