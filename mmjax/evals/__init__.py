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


def embed_images(encode_image, read, n: int, chunk: int = 1024) -> tuple[np.ndarray, list[int]]:
  """`(embeddings [K, D] float64, the K indices kept)` of images `read(0..n-1)` (uint8 [H, W, 3] of
  any size, or None for an unreadable one, which is skipped), read and embedded `chunk` at a time so
  a large set never sits in memory decoded."""
  parts, kept = [], []
  for start in range(0, n, chunk):
    images = [(i, read(i)) for i in range(start, min(start + chunk, n))]
    images = [(i, image) for i, image in images if image is not None]
    if images:
      parts.append(np.asarray(encode_image([image for _, image in images]), np.float64))
      kept.extend(i for i, _ in images)
  return (np.concatenate(parts) if parts else np.zeros((0, 0))), kept
