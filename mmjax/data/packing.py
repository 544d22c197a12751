"""Caption packing for causal text towers, and image packing for NaFlex towers: several per row, so
the towers skip padding.

A CLIP text tower is causal and reads one token per caption (its end of text), so the positions
after it change nothing. Captions are packed, at most k per row (`data.captions_per_row`), into
rows of the same context length; each keeps its own positions (0, 1, ...) and attends only
within its segment, so every pooled output equals the unpacked one up to float rounding.

The packed batch (`pack_captions`):
  text            [rows, L] int32   the packed token ids (0 where nothing is packed)
  text_positions  [rows, L] int32   each token's position in its caption
  text_segments   [rows, L] int32   1..k: the caption in the row; 0: padding
  text_pool       [rows, k] int32   the column of each segment's pooled token (0 for an empty
                                    segment, whose output is never read)
  text_slot       [batch]   int32   caption i's pooled output is row slot // k, segment slot % k

`rows` is the rows the captions need rounded up to a multiple of 1/32 of the batch
(`row_count`), so a training step compiles for few row counts. With several processes each
packs its own slice of the batch into the same row count (the largest any of them needs), and
`text_slot` indexes the global rows.

Images (`pack_images`, NaViT's packing): a NaFlex tower's patch sequences, at most k per row of the
same length, each image a segment of its own (`mmjax.models.vit.ViT`), so every pooled output
equals the unpacked one up to float rounding:
  image           dict(patches [rows, n, p * p * 3], grid [rows, k, 2])  each slot's grid; (0, 0) empty
  image_slot      [batch]   int32   image i's pooled output is row slot // k, slot slot % k
"""
from __future__ import annotations

import math

import numpy as np

from mmjax.errors import ConfigError

PACKED_KEYS = ("text_positions", "text_segments", "text_pool", "text_slot")
END_OF_TEXT_POOLS = ("eos", "argmax")


def check_packable(causal: bool, pool: str, where: str) -> None:
  """Refuses a text tower that reads past a caption's end of text: packing would change it."""
  if not causal or pool not in END_OF_TEXT_POOLS:
    raise ConfigError(f"{where}: packed captions need a causal text tower pooled at its end of text (causal "
                      f"True, pool one of {END_OF_TEXT_POOLS}); got causal={causal}, pool={pool!r}")


def model_fields(batch: dict) -> dict | None:
  """The packing fields of a batch as `TwoTower(text_packing=...)` takes them; None if unpacked."""
  if "text_slot" not in batch:
    return None
  return {key.removeprefix("text_"): batch[key] for key in PACKED_KEYS}


def pooled_lengths(tokens: np.ndarray, pool: str, eos_id: int) -> np.ndarray:
  """Tokens each caption needs: up to and including the one the tower pools (its rule)."""
  check_packable(True, pool, "pooled_lengths")
  if pool == "argmax":
    return np.argmax(tokens, axis=1) + 1
  is_eos = tokens == eos_id
  return np.where(is_eos.any(axis=1), np.argmax(is_eos, axis=1) + 1, tokens.shape[1])


def row_count(batch: int, needed: int, divisor: int = 1) -> int:
  """The rows a packed batch takes when its captions need `needed`: rounded up to a multiple of
  1/32 of the batch (and of `divisor`), so a run compiles its step for few row counts."""
  step = divisor * math.ceil(batch / (32 * divisor))
  return min(batch, step * math.ceil(needed / step))


def pack_rows(lengths: np.ndarray, context: int, per_row: int) -> list[list[int]]:
  """Rows of caption indices, longest first: each caption, longest to shortest, joins the row
  with the least room left that holds it and has fewer than `per_row` captions (best fit
  decreasing). With `per_row=2` that uses as few rows as any pairing."""
  rows: list[list[int]] = []
  open_rows: list[list[int]] = [[] for _ in range(context + 1)]  # By room left.
  for caption in np.argsort(-lengths, kind="stable"):
    n = int(lengths[caption])
    room = next((r for r in range(n, context + 1) if open_rows[r]), None)
    if room is None:
      row, room = len(rows), context
      rows.append([])
    else:
      row = open_rows[room].pop()
    rows[row].append(int(caption))
    if len(rows[row]) < per_row:
      open_rows[room - n].append(row)
  return rows


def pack_captions(tokens: np.ndarray, lengths: np.ndarray, per_row: int, divisor: int = 1,
                  agree=lambda rows: rows) -> dict[str, np.ndarray]:
  """The packed batch (module docstring) of `tokens` [batch, L] whose captions are `lengths` long,
  at most `per_row` per row; the row count is a multiple of `divisor` (the batch-sharded
  devices). `agree` maps the rows this batch needs to the rows every process's batch needs
  (their maximum)."""
  batch, context = tokens.shape
  if batch % divisor:
    raise ConfigError(f"batch {batch} is not divisible by the {divisor} batch-sharded devices")
  if lengths.min(initial=1) < 1 or lengths.max(initial=0) > context:
    raise ConfigError(f"caption lengths must lie in [1, {context}]; got {lengths.min()}..{lengths.max()}")
  packed_rows = pack_rows(lengths, context, per_row)
  rows = row_count(batch, agree(len(packed_rows)), divisor)
  out = {"text": np.zeros((rows, context), np.int32), "text_positions": np.zeros((rows, context), np.int32),
         "text_segments": np.zeros((rows, context), np.int32), "text_pool": np.zeros((rows, per_row), np.int32),
         "text_slot": np.zeros(batch, np.int32)}
  for row, captions in enumerate(packed_rows):
    start = 0
    for segment, caption in enumerate(captions):
      n = lengths[caption]
      out["text"][row, start:start + n] = tokens[caption, :n]
      out["text_positions"][row, start:start + n] = np.arange(n)
      out["text_segments"][row, start:start + n] = segment + 1
      out["text_pool"][row, segment] = start + n - 1
      out["text_slot"][caption] = per_row * row + segment
      start += n
  return out


def pack_images(image: dict[str, np.ndarray], per_row: int, divisor: int = 1,
                agree=lambda rows: rows) -> dict:
  """`{"image": ..., "image_slot": ...}` (module docstring): the NaFlex images `image` (dict(patches
  [batch, n, p * p * 3], grid [batch, 2]), each image's patches first in its row) packed at most
  `per_row` to a row of n patches; rows, `divisor` and `agree` as `pack_captions`."""
  patches, grid = np.asarray(image["patches"]), np.asarray(image["grid"])
  batch, length = patches.shape[:2]
  if batch % divisor:
    raise ConfigError(f"batch {batch} is not divisible by the {divisor} batch-sharded devices")
  areas = grid[:, 0] * grid[:, 1]
  packed_rows = pack_rows(areas, length, per_row)
  rows = row_count(batch, agree(len(packed_rows)), divisor)
  out_patches = np.zeros((rows,) + patches.shape[1:], patches.dtype)
  out_grid, slots = np.zeros((rows, per_row, 2), np.int32), np.zeros(batch, np.int32)
  for row, images in enumerate(packed_rows):
    start = 0
    for slot, i in enumerate(images):
      out_patches[row, start:start + areas[i]] = patches[i, :areas[i]]
      out_grid[row, slot], slots[i] = grid[i], per_row * row + slot
      start += areas[i]
  return {"image": {"patches": out_patches, "grid": out_grid}, "image_slot": slots}
