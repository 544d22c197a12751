"""Referring-expression grounding: boxes predicted for "the red circle" against the true ones."""
from __future__ import annotations

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU [N] of boxes a, b [N, 4] (x0, y0, x1, y1)."""
  w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
  h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  inter = w * h
  return inter / (area(a) + area(b) - inter)


def centre_boxes(true: np.ndarray) -> np.ndarray:
  """The baseline that ignores the image and the expression: a box of the true boxes' mean width
  and height at the image's centre, for every query."""
  w, h = (true[:, 2] - true[:, 0]).mean(), (true[:, 3] - true[:, 1]).mean()
  return np.tile([0.5 - w / 2, 0.5 - h / 2, 0.5 + w / 2, 0.5 + h / 2], (len(true), 1))


def evaluate(predicted: np.ndarray, true: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
  """`acc@0.5` (the fraction of boxes with IoU >= threshold), `miou`, and the centre-box baseline's
  `centre_acc@0.5`, for boxes [N, 4] in the same coordinates."""
  iou, centre = box_iou(predicted, true), box_iou(centre_boxes(true), true)
  return {f"acc@{threshold:g}": float(np.mean(iou >= threshold)), "miou": float(iou.mean()),
          f"centre_acc@{threshold:g}": float(np.mean(centre >= threshold))}
