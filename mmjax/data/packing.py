"""Caption packing for causal text towers: two captions per row, so the tower skips padding.

A CLIP text tower is causal and reads one token per caption (its end of text), so the positions
after it change nothing. Captions are paired, short with long, into rows of the same context
length; each keeps its own positions (0, 1, ...) and attends only within its segment, so every
pooled output equals the unpacked one up to float rounding.

The packed batch (`pack_caption_pairs`):
  text            [rows, L] int32   the packed token ids (0 where nothing is packed)
  text_positions  [rows, L] int32   each token's position in its caption
  text_segments   [rows, L] int32   1 or 2: the caption in the row; 0: padding
  text_pool       [rows, 2] int32   the column of each segment's pooled token (an empty second
                                    segment repeats the first's; its output is never read)
  text_slot       [batch]   int32   caption i's pooled output is row slot // 2, segment slot % 2

`rows` is the smallest of a few sizes (`row_counts`: 1/2, 5/8, ... of the batch) that holds
the pairs, so a training step compiles for at most five row counts. With several processes each
packs its own slice of the batch into the same row count (the largest any of them needs), and
`text_slot` indexes the global rows.
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


def row_counts(batch: int, divisor: int = 1) -> list[int]:
  """The packed row counts a batch may take: k/8 of it for k = 4..8, rounded up to `divisor`."""
  return sorted({divisor * math.ceil(math.ceil(batch * k / 8) / divisor) for k in range(4, 9)})


def pair_captions(lengths: np.ndarray, context: int) -> list[tuple[int, int | None]]:
  """Rows as (longer, shorter or None) caption indices: the longest caption left takes the
  shortest one left when both fit in `context`, which pairs as many as any pairing can."""
  order = np.argsort(lengths, kind="stable")
  short, long_ = 0, len(order) - 1
  rows = []
  while short <= long_:
    a = int(order[long_])
    if short < long_ and lengths[a] + lengths[order[short]] <= context:
      rows.append((a, int(order[short])))
      short += 1
    else:
      rows.append((a, None))
    long_ -= 1
  return rows


def pack_caption_pairs(tokens: np.ndarray, lengths: np.ndarray, divisor: int = 1,
                       agree=lambda rows: rows) -> dict[str, np.ndarray]:
  """The packed batch (module docstring) of `tokens` [batch, L] whose captions are `lengths` long;
  the row count is a multiple of `divisor` (the batch-sharded devices). `agree` maps the rows
  this batch needs to the rows every process's batch needs (their maximum)."""
  batch, context = tokens.shape
  if batch % divisor:
    raise ConfigError(f"batch {batch} is not divisible by the {divisor} batch-sharded devices")
  if lengths.min(initial=1) < 1 or lengths.max(initial=0) > context:
    raise ConfigError(f"caption lengths must lie in [1, {context}]; got {lengths.min()}..{lengths.max()}")
  pairs = pair_captions(lengths, context)
  needed = agree(len(pairs))
  rows = next(r for r in row_counts(batch, divisor) if r >= needed)
  out = {"text": np.zeros((rows, context), np.int32), "text_positions": np.zeros((rows, context), np.int32),
         "text_segments": np.zeros((rows, context), np.int32), "text_pool": np.zeros((rows, 2), np.int32),
         "text_slot": np.zeros(batch, np.int32)}
  for row, captions in enumerate(pairs):
    start = 0
    for segment, caption in enumerate(captions):
      if caption is None:
        out["text_pool"][row, 1] = out["text_pool"][row, 0]
        continue
      n = lengths[caption]
      out["text"][row, start:start + n] = tokens[caption, :n]
      out["text_positions"][row, start:start + n] = np.arange(n)
      out["text_segments"][row, start:start + n] = segment + 1
      out["text_pool"][row, segment] = start + n - 1
      out["text_slot"][caption] = 2 * row + segment
      start += n
  return out
