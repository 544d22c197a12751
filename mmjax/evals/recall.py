"""Image<->text retrieval recall@k (keys `i2t_r1`, `t2i_r5`, ...): pair i is image i with caption i
(`evaluate`), or each image has several captions (`evaluate_captions`, COCO and Flickr30k)."""
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


def evaluate_captions(zimg: np.ndarray, ztxt: np.ndarray, caption_image: Sequence[int],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Recall@k with several captions per image, as CLIP_benchmark counts it: text->image finds a
  caption's own image within the top k images; image->text counts an image when any of its
  captions is within its top k texts. Ranks count strictly higher scores."""
  sim = np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T  # [images, texts]
  owner = np.asarray(caption_image)
  own = sim[owner, np.arange(len(owner))]  # Each caption's score with its own image.
  t2i_rank = (sim.T > own[:, None]).sum(axis=1)
  i2t_rank = np.full(len(sim), len(owner))
  for text, image in enumerate(owner):  # An image's best-ranked caption, among all texts.
    i2t_rank[image] = min(i2t_rank[image], int((sim[image] > own[text]).sum()))
  out = {f"i2t_r{k}": float((i2t_rank < k).mean()) for k in ks}
  out.update({f"t2i_r{k}": float((t2i_rank < k).mean()) for k in ks})
  return out
