"""Embedding indexes over images or texts, built with a trained two-tower model; exact top-k search.

An `EmbeddingIndex` holds L2-normalised embeddings [N, D] (float32), one item string per row
(the caption, or the image's path or id) and the modality the rows embed. `search(queries, k)`
returns the k highest cosine similarities found by `jax.lax.top_k`; with a mesh the rows are
split over all its devices, each device keeps its own top k and the D·k candidates are merged,
so a device holds N/D rows. An index is a directory: `embeddings.npy` and `index.json`.
Images and texts are embedded with an export's encoders (`mmjax.load(...).encode_image` / `encode_text`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mmjax import bundle
from mmjax.errors import ConfigError, DataError

MODALITIES = ("image", "text")
EMBEDDINGS, META = "embeddings.npy", "index.json"


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k(queries, keys, k):
  return jax.lax.top_k(queries @ keys.T, k)


def top_k(queries: np.ndarray, keys: np.ndarray, k: int, mesh=None) -> tuple[np.ndarray, np.ndarray]:
  """`(scores [Q, k], indices [Q, k])` of the k largest inner products of each query with `keys` [N, D],
  best first. With `mesh`, `keys` are split over all of its devices."""
  n = len(keys)
  if not 1 <= k <= n:
    raise ConfigError(f"k={k} must be in [1, {n}] for an index of {n} rows")
  queries, keys = jnp.asarray(queries, jnp.float32), np.asarray(keys, np.float32)
  if mesh is None or mesh.size == 1:
    scores, indices = _top_k(queries, jnp.asarray(keys), k)
    return np.asarray(scores), np.asarray(indices)
  shards = mesh.size
  rows = -(-n // shards)
  if k > rows:
    raise ConfigError(f"k={k} exceeds the {rows} rows each of the {shards} devices holds; search without a mesh")
  padded = np.concatenate([keys, np.zeros((rows * shards - n, keys.shape[1]), np.float32)])
  scores, indices = _sharded_search(mesh, rows, n, k)(queries, padded)
  return np.asarray(scores), np.asarray(indices)


@functools.lru_cache(maxsize=None)
def _sharded_search(mesh, rows: int, n: int, k: int):
  """The jitted search over `rows` keys per device of `n` real ones; built once per shape."""
  axes = tuple(mesh.axis_names)

  def local(q, block):
    first = jax.lax.axis_index(axes) * rows
    scores = q @ block.T
    scores = jnp.where(first + jnp.arange(rows) < n, scores, -jnp.inf)  # Padding rows never win.
    values, index = jax.lax.top_k(scores, k)
    values = jax.lax.all_gather(values, axes, axis=1, tiled=True)
    index = jax.lax.all_gather(index + first, axes, axis=1, tiled=True)
    best, where = jax.lax.top_k(values, k)
    return best, jnp.take_along_axis(index, where, axis=1)

  # Every device merges the same gathered candidates, so the outputs are replicated.
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes)), out_specs=(P(), P()), check_vma=False))


@dataclasses.dataclass
class EmbeddingIndex:
  embeddings: np.ndarray  # [N, D] float32, rows L2-normalised.
  items: list[str]
  modality: str
  # Per row, the source records it stands for (a caption shared by several images); None: row i is record i.
  owners: list[list[int]] | None = None

  def __post_init__(self):
    if self.modality not in MODALITIES:
      raise ConfigError(f"index modality={self.modality!r}: expected one of {MODALITIES}")
    if len(self.items) != len(self.embeddings):
      raise ConfigError(f"{len(self.items)} items for {len(self.embeddings)} embeddings")
    if self.owners is not None and len(self.owners) != len(self.items):
      raise ConfigError(f"{len(self.owners)} owner lists for {len(self.items)} items")

  def owners_of(self, row: int) -> list[int]:
    return [row] if self.owners is None else list(self.owners[row])

  def search(self, queries: np.ndarray, k: int, mesh=None) -> list[list[tuple[float, int, str]]]:
    """Per query, the k best `(cosine, row, item)`, best first."""
    scores, indices = top_k(queries, self.embeddings, k, mesh)
    return [[(float(s), int(i), self.items[i]) for s, i in zip(row_s, row_i)] for row_s, row_i in zip(scores, indices)]

  def save(self, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    np.save(os.path.join(path, EMBEDDINGS), np.asarray(self.embeddings, np.float32))
    with open(os.path.join(path, META), "w", encoding="utf-8") as f:
      json.dump({"modality": self.modality, "items": list(self.items), "owners": self.owners}, f)
    return path

  @classmethod
  def load(cls, path: str) -> EmbeddingIndex:
    missing = [n for n in (EMBEDDINGS, META) if not os.path.exists(os.path.join(path, n))]
    if missing:
      raise DataError(f"{path} is not an embedding index: missing {missing}")
    with open(os.path.join(path, META), encoding="utf-8") as f:
      meta = json.load(f)
    return cls(np.load(os.path.join(path, EMBEDDINGS)), meta["items"], meta["modality"], meta.get("owners"))


def image_similarity_selector(export_dir: str):
  """`select(query_images, pool_images, k) -> [Q, k]` pool indices of the k most similar images by the
  cosine of the export's image embeddings, best first (RICES demonstrations)."""
  encoder = bundle.load(export_dir)
  embedded = {}  # Callers reuse one pool and one query set across shot counts: embed each once.

  def embed(images):
    key = hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()
    if key not in embedded:
      embedded[key] = encoder.encode_image(images)
    return embedded[key]

  def select(query_images, pool_images, k):
    return top_k(embed(query_images), embed(pool_images), k)[1]

  return select
