"""Evaluators for two-tower models; each works on embedding functions and returns named scalars.
`map_padded_chunks` and `in_chunks` run a compiled function over fixed-size batches, `embed_rows`
over every device and process, resumably."""
import json
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmjax import parallel
from mmjax.errors import ConfigError
from mmjax.metrics import fmt_duration


def map_padded_chunks(fn, columns, chunk: int) -> list:
  """`fn(*chunk of each column)[:rows of the chunk]` for each chunk of `chunk` rows of `columns`
  (arrays, lists, or dicts of arrays such as NaFlex images, all of equal length), in order. The
  last chunk is padded to `chunk` rows by repeating its final row, so `fn` compiles once; `fn`'s
  rows for the padding are dropped."""
  out = []
  for start in range(0, _length(columns[0]), chunk):
    parts = [_rows(column, slice(start, start + chunk)) for column in columns]
    rows = _length(parts[0])
    out.append(fn(*[_pad_rows(part, chunk) for part in parts])[:rows])
  return out


def _length(column) -> int:
  return len(next(iter(column.values()))) if isinstance(column, dict) else len(column)


def _rows(column, rows: slice):
  return {k: v[rows] for k, v in column.items()} if isinstance(column, dict) else column[rows]


def _pad_rows(rows, size: int):
  if isinstance(rows, dict):
    return {k: _pad_rows(v, size) for k, v in rows.items()}
  if isinstance(rows, np.ndarray):
    return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), axis=0)])
  return list(rows) + [rows[-1]] * (size - len(rows))


def in_chunks(fn, arrays, chunk: int) -> np.ndarray:
  """`fn(*rows)` over chunks of `chunk` rows of `arrays`, concatenated (`map_padded_chunks`). One process."""
  return np.concatenate(map_padded_chunks(lambda *rows: np.asarray(jax.device_get(fn(*rows))), arrays, chunk))


def embed_rows(encode, read, n: int, mesh, batch_size: int, blank: np.ndarray, cache_dir: str | None = None,
               what: str = "rows") -> tuple[np.ndarray, np.ndarray]:
  """`(embeddings [K, D] float64, the K indices kept)` of rows `read(0..n-1)`, on every process.

  The rows go in fixed batches of `batch_size` over every batch-sharded device of `mesh`: each process
  reads only its own contiguous slice of each batch (`read(i)`: an array, or a dict of them, shaped
  as `blank`; or None for an unreadable row, which is skipped), the slices become one global array and `encode` (a jitted
  function returning replicated embeddings) embeds it. So a large set never sits in memory decoded,
  and N processes read N times faster.

  With `cache_dir` (a directory every process sees, as checkpoints need), each batch's embeddings are
  saved there once made, and a rerun with the same directory loads them instead: a killed run resumes
  where it stopped. The directory records `n` and `batch_size` and refuses other ones. Process 0
  prints progress with an ETA every `PROGRESS_SECONDS`."""
  divisor = parallel.batch_size_divisor(mesh)
  if batch_size % divisor:
    raise ConfigError(f"batch size {batch_size} (evals.batch_size, or evaluate's --batch_size) must be divisible "
                      f"by the {divisor} batch-sharded devices")
  cache = _EmbeddingCache(cache_dir, what, n, batch_size) if cache_dir else None
  rows = batch_size // jax.process_count()
  first = jax.process_index() * rows
  progress = _Progress(what, n)
  parts, kept = [], []
  for start in range(0, n, batch_size):
    z, valid = cache.load(start) if cache else (None, None)
    if z is None:
      local = [read(i) if i < n else None for i in range(start + first, start + first + rows)]
      local_valid = np.array([x is not None for x in local])
      images = jax.tree.map(lambda *rows: np.stack(rows), *[blank if x is None else x for x in local])
      with jax.set_mesh(mesh):
        z = np.asarray(jax.device_get(encode(parallel.global_batch({"x": images}, mesh)["x"])), np.float64)
      valid = multihost_utils.process_allgather(local_valid, tiled=True)
      if cache:
        cache.save(start, z, valid)
    else:
      progress.cached += min(batch_size, n - start)
    rows_here = np.flatnonzero(valid[: n - start])
    parts.append(z[rows_here])
    kept.extend(start + rows_here)
    progress.update(min(start + batch_size, n))
  progress.done()
  return (np.concatenate(parts) if parts else np.zeros((0, 0))), np.array(kept, dtype=np.int64)


PROGRESS_SECONDS = 10.0


class _Progress:
  """`embedding images 12,288/50,000 (24.6%) | 210/s | ETA 3m00s`, from process 0."""

  def __init__(self, what: str, n: int):
    self.what, self.n, self.cached = what, n, 0
    self.enabled = jax.process_index() == 0 and n > 0
    self._start = self._last = time.perf_counter()

  def update(self, done: int) -> None:
    now = time.perf_counter()
    if not self.enabled or now - self._last < PROGRESS_SECONDS or done >= self.n:
      return
    self._last = now
    rate = (done - self.cached) / max(now - self._start, 1e-9)
    eta = fmt_duration((self.n - done) / max(rate, 1e-9))
    print(f"embedding {self.what} {done:,}/{self.n:,} ({100 * done / self.n:.1f}%) | {rate:.0f}/s | ETA {eta}",
          flush=True)

  def done(self) -> None:
    if self.enabled:
      cached = f" ({self.cached:,} from the cache)" if self.cached else ""
      print(f"embedded {self.n:,} {self.what} in {fmt_duration(time.perf_counter() - self._start)}{cached}",
            flush=True)


class _EmbeddingCache:
  """`cache_dir/<what>/`: `manifest.json` ({n, batch_size}) and one `<start>.npz` per batch
  (embeddings and which rows were readable), written by process 0, atomically."""

  def __init__(self, cache_dir: str, what: str, n: int, batch_size: int):
    self.directory = os.path.join(cache_dir, what.replace(" ", "_"))
    manifest, expected = os.path.join(self.directory, "manifest.json"), {"n": n, "batch_size": batch_size}
    if os.path.exists(manifest):
      with open(manifest, encoding="utf-8") as f:
        found = json.load(f)
      if found != expected:
        raise ConfigError(f"{self.directory} caches embeddings of {found}, not of this run's {expected}: "
                          "give another cache directory or delete it")
    elif jax.process_index() == 0:
      os.makedirs(self.directory, exist_ok=True)
      _write_atomically(manifest, lambda f: f.write(json.dumps(expected).encode()))

  def _path(self, start: int) -> str:
    return os.path.join(self.directory, f"{start:010d}.npz")

  def load(self, start: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    # Every process takes the same branch (the other one runs collectives), so process 0 decides.
    have = bool(multihost_utils.broadcast_one_to_all(np.array(os.path.exists(self._path(start)))))
    if not have:
      return None, None
    with np.load(self._path(start)) as saved:
      return saved["z"], saved["valid"]

  def save(self, start: int, z: np.ndarray, valid: np.ndarray) -> None:
    if jax.process_index() == 0:
      _write_atomically(self._path(start), lambda f: np.savez(f, z=z, valid=valid))


def _write_atomically(path: str, write) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)
