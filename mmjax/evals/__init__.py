"""Evaluators for two-tower models; each works on embedding functions and returns named scalars."""
import jax
import numpy as np


def in_chunks(fn, arrays, chunk: int) -> np.ndarray:
  """`fn(*rows)` over chunks of `chunk` rows of `arrays`, concatenated. The last chunk is padded by
  repeating its final row, so `fn` compiles once; the padding rows are dropped. One process."""
  n = len(arrays[0])
  out = []
  for start in range(0, n, chunk):
    parts = [a[start:start + chunk] for a in arrays]
    padded = [np.concatenate([p, np.repeat(p[-1:], chunk - len(p), axis=0)]) for p in parts]
    out.append(np.asarray(jax.device_get(fn(*padded)))[:len(parts[0])])
  return np.concatenate(out)
