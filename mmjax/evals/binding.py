"""Attribute binding: does the image prefer its caption over the one with attributes swapped?

"a red circle and a blue square" must beat "a blue circle and a red square"; a model
that sees only a bag of attributes scores 50%.
"""
from __future__ import annotations

import numpy as np


def evaluate(zimg: np.ndarray, ztrue: np.ndarray, zswapped: np.ndarray) -> dict[str, float]:
  zimg = np.asarray(zimg, np.float64)
  s_true = np.sum(zimg * np.asarray(ztrue, np.float64), axis=1)
  s_swap = np.sum(zimg * np.asarray(zswapped, np.float64), axis=1)
  return {"acc": float((s_true > s_swap).mean())}
