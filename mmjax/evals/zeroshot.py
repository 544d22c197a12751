"""Zero-shot classification: class prompts from templates, ensembled, nearest class embedding."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def class_embeddings(embed_texts: Callable[[list[str]], np.ndarray], class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
  """[C, D]: each class's prompts embedded, averaged over templates, re-normalised."""
  prompts = [t.format(name) for name in class_names for t in templates]
  z = np.asarray(embed_texts(prompts), np.float64).reshape(len(class_names), len(templates), -1)
  z = z.mean(axis=1)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def evaluate(zimg: np.ndarray, zclass: np.ndarray, labels: np.ndarray,
             class_groups: dict[str, np.ndarray] | None = None) -> dict[str, float]:
  """Top-1 accuracy overall and per named group of classes (e.g. `seen`, `held_out`)."""
  pred = np.argmax(np.asarray(zimg) @ np.asarray(zclass).T, axis=1)
  correct = pred == labels
  out = {"acc": float(correct.mean())}
  for name, in_group in (class_groups or {}).items():
    rows = np.asarray(in_group)[labels]
    if rows.any():
      out[f"acc_{name}"] = float(correct[rows].mean())
  return out


def classification_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """CLIP_benchmark's zero-shot classification metrics from [N, C] scores: top-1 and top-5 accuracy
  (top-C when C < 5) and the mean over classes of each class's recall (balanced accuracy)."""
  labels = np.asarray(labels)
  order = np.argsort(-np.asarray(scores), axis=1, kind="stable")
  top1 = order[:, 0] == labels
  top5 = (order[:, :5] == labels[:, None]).any(axis=1)
  recall = [top1[labels == c].mean() for c in np.unique(labels)]
  return {"acc1": float(top1.mean()), "acc5": float(top5.mean()), "mean_per_class_recall": float(np.mean(recall))}

