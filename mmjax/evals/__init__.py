"""Evaluators for two-tower models; each works on embedding functions and returns named scalars.
`map_padded_chunks` and `in_chunks` run a compiled function over fixed-size batches."""
import jax
import numpy as np


def map_padded_chunks(fn, columns, chunk: int) -> list:
  """`fn(*chunk of each column)[:rows of the chunk]` for each chunk of `chunk` rows of `columns`
  (arrays or lists of equal length), in order. The last chunk is padded to `chunk` rows by
  repeating its final row, so `fn` compiles once; `fn`'s rows for the padding are dropped."""
  out = []
  for start in range(0, len(columns[0]), chunk):
    parts = [column[start:start + chunk] for column in columns]
    rows = len(parts[0])
    out.append(fn(*[_pad_rows(part, chunk) for part in parts])[:rows])
  return out


def _pad_rows(rows, size: int):
  if isinstance(rows, np.ndarray):
    return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), axis=0)])
  return list(rows) + [rows[-1]] * (size - len(rows))


def in_chunks(fn, arrays, chunk: int) -> np.ndarray:
  """`fn(*rows)` over chunks of `chunk` rows of `arrays`, concatenated (`map_padded_chunks`). One process."""
  return np.concatenate(map_padded_chunks(lambda *rows: np.asarray(jax.device_get(fn(*rows))), arrays, chunk))
