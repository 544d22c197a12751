"""Image<->text retrieval recall@k (keys `i2t_r1`, `t2i_r5`, ...); pair i is image i with caption i."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _recall(sim: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
  # Rank of the true match = number of candidates scoring strictly higher.
  true = np.diag(sim)[:, None]
  rank = (sim > true).sum(axis=1)
  return {k: float((rank < k).mean()) for k in ks}


def evaluate(zimg: np.ndarray, ztxt: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  sim = np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T
  out = {}
  for k, v in _recall(sim, ks).items():
    out[f"i2t_r{k}"] = v
  for k, v in _recall(sim.T, ks).items():
    out[f"t2i_r{k}"] = v
  return out
