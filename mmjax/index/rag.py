"""Retrieval-augmented generation on the shapes questions: captions retrieved for each image go
into the prompt before the question (fusion in the decoder: the language model reads every
retrieved passage together with the image and the question).

`config.data.rag` switches it on for training and evaluation alike:

  retriever  a two-tower export (`mmjax.export`) whose image tower embeds the image and whose
             text tower embeds the captions of `shapes_vqa.caption_pool` (`pool` scenes)
  k          captions per image (0: none, the plain prompts)
  records    training episodes (of data.media_per_record records each) the retrieval is computed
             for, once, before training starts
  selection  "retrieved" (the k captions nearest the image) or "random" (k pool captions drawn
             at random: the control that shows whether what is retrieved matters)
"""
from __future__ import annotations

import functools
import time

import jax
import numpy as np

from mmjax import bundle
from mmjax.data import shapes_vqa
from mmjax.errors import ConfigError
from mmjax.metrics import fmt_duration
from mmjax.index import EmbeddingIndex

SELECTIONS = ("retrieved", "random")
# Images embedded per call while the training records' contexts are computed (bounds host memory).
_CHUNK = 4096


class CaptionRetriever:
  """`retrieve(images, k) -> [N][k]` distinct captions of the pool, nearest each image first
  (cosine of the export's embeddings), or drawn at random (`selection="random"`, seeded)."""

  def __init__(self, export_dir: str, captions: list[str], selection: str = "retrieved", seed: int = 0):
    if selection not in SELECTIONS:
      raise ConfigError(f"data.rag.selection={selection!r}: expected one of {SELECTIONS}")
    if len(set(captions)) != len(captions):
      raise ConfigError("CaptionRetriever: the caption pool has duplicates; pass distinct captions")
    self.encoder, self.index = _embedded_pool(export_dir, tuple(captions))
    self.selection, self._rng = selection, np.random.default_rng(seed)

  def __call__(self, images: np.ndarray, k: int) -> list[list[str]]:
    if not 1 <= k <= len(self.index.items):
      raise ConfigError(f"data.rag.k={k}: must be in [1, {len(self.index.items)}], the captions in the pool")
    if self.selection == "random":
      rows = [self._rng.choice(len(self.index.items), k, replace=False) for _ in range(len(images))]
      return [[self.index.items[i] for i in row] for row in rows]
    hits = self.index.search(self.encoder.encode_image(images), k)
    return [[item for _, _, item in row] for row in hits]


@functools.lru_cache(maxsize=1)
def _embedded_pool(export_dir: str, captions: tuple[str, ...]) -> tuple[bundle.LoadedModel, EmbeddingIndex]:
  """The export's encoder and an index of its caption embeddings, built once per process: a run's
  training source and its eval sets search the same pool."""
  encoder = bundle.load(export_dir)
  return encoder, EmbeddingIndex(encoder.encode_text(list(captions)), list(captions), "text")


def retriever(data) -> CaptionRetriever:
  """The `CaptionRetriever` of `data.rag` over the caption pool of `data`'s scenes."""
  rag, seed = data.rag, data.get("seed", 0)
  if not rag.get("retriever"):
    raise ConfigError("data.rag.retriever: required, a two-tower export (python -m mmjax.export)")
  pool = shapes_vqa.caption_pool(seed, rag.get("pool", 8192), data.get("held_out_fraction", 0.2))
  return CaptionRetriever(rag.retriever, pool, rag.get("selection", "retrieved"), seed)


def augment(records: list[dict], retrieve: CaptionRetriever, k: int) -> list[dict]:
  """Records with the `k` captions `retrieve` finds for their images in their prompts."""
  contexts = retrieve(np.stack([r["image"] for r in records]), k)
  return [shapes_vqa.with_context(r, c) for r, c in zip(records, contexts)]


def training_source(data) -> shapes_vqa.RetrievalAugmentedSource:
  """The training episodes of `data` (a shapes_vqa `config.data` with `rag`), their contexts
  retrieved for the first `rag.records` episodes, `_CHUNK` images at a time."""
  rag, m = data.rag, data.get("media_per_record", 1)
  kw = dict(seed=data.get("seed", 0), image_size=data.get("image_size", 64),
            held_out_fraction=data.get("held_out_fraction", 0.2), caption_fraction=data.get("caption_fraction", 0.25),
            described_fraction=data.get("described_fraction", 0.0))
  records = rag.get("records", 0) * m
  if records <= 0:
    raise ConfigError(f"data.rag.records={rag.get('records')}: need a positive number of training records")
  plain = shapes_vqa.ShapesVQASource(num_records=records, **kw)
  if not rag.get("k", 0):
    contexts = [[] for _ in range(records)]
  else:
    retrieve, contexts, began = retriever(data), [], time.perf_counter()
    for start in range(0, records, _CHUNK):
      contexts += retrieve(np.stack([plain.record(i)["image"] for i in range(start, min(start + _CHUNK, records))]),
                           rag.k)
      if jax.process_index() == 0:
        rate = len(contexts) / (time.perf_counter() - began)
        print(f"rag: captions retrieved for {len(contexts)}/{records} records | {rate:.0f} records/s | "
              f"ETA {fmt_duration((records - len(contexts)) / rate)}", flush=True)
  return shapes_vqa.RetrievalAugmentedSource(contexts, media_per_record=m, **kw)
