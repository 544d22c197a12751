"""Dense-feature probes: how much of each patch's content an image tower's frozen patch features hold.

A linear probe (`mmjax.adapt.probe`, closed-form ridge) is fitted on the features of every patch of
some images to predict each patch's class, then scored on other images by mean intersection over
union, as segmentation probes are (SigLIP 2's and TIPS's dense evaluations).
"""
from __future__ import annotations

import numpy as np

from mmjax.adapt import probe as probe_lib


def patch_labels(label_maps: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """[N, gh * gw] int: the most common pixel label of each patch (the smallest on a tie), the patches
  tiling each [H, W] label map in a gh x gw grid, row by row (pixel y lies in patch row y * gh // H)."""
  n, height, width = label_maps.shape
  gh, gw = grid
  cell = (np.arange(height) * gh // height)[:, None] * gw + (np.arange(width) * gw // width)[None, :]
  classes = int(label_maps.max()) + 1
  flat = (np.arange(n)[:, None, None] * (gh * gw) + cell[None]) * classes + label_maps
  counts = np.bincount(flat.ravel(), minlength=n * gh * gw * classes).reshape(n, gh * gw, classes)
  return counts.argmax(axis=-1)


def mean_iou(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
  """Mean over the classes present in `truth` of |predicted = c and truth = c| / |predicted = c or truth = c|."""
  truth, predicted = np.asarray(truth).ravel(), np.asarray(predicted).ravel()
  confusion = np.bincount(truth * num_classes + predicted, minlength=num_classes ** 2).reshape(num_classes, -1)
  hits = np.diag(confusion)
  union = confusion.sum(axis=0) + confusion.sum(axis=1) - hits
  present = confusion.sum(axis=1) > 0
  return float(np.mean(hits[present] / union[present]))


def probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
          test_labels: np.ndarray, num_classes: int, l2: float = 1e-3) -> dict[str, float]:
  """`{"miou", "patch_acc"}` of a ridge probe from patch features [P, D] to patch labels [P], fitted on
  the train patches and scored on the test ones."""
  w, b = probe_lib.fit("ridge", train_features, train_labels, num_classes, l2=l2)
  predicted = np.asarray(probe_lib.predict(w, b, test_features)).argmax(axis=-1)
  return {"miou": mean_iou(predicted, test_labels, num_classes),
          "patch_acc": float(np.mean(predicted == np.asarray(test_labels)))}
