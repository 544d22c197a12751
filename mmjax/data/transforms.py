"""Per-example grain transforms on dict(image=uint8 [H, W, 3], caption=str, ...)."""
import dataclasses

import grain
import numpy as np
from PIL import Image

from mmjax.data.tokenizer import Tokenizer


@dataclasses.dataclass
class ResizeImage(grain.transforms.Map):
  """Resizes the shorter side to `size` (PIL bilinear) and centre-crops to size x size.

  Images that already are size x size pass through untouched.
  """
  size: int

  def map(self, element: dict) -> dict:
    image = element["image"]
    h, w = image.shape[:2]
    if h == w == self.size:
      return element
    scale = self.size / min(h, w)
    nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    top, left = (nh - self.size) // 2, (nw - self.size) // 2
    return element | dict(image=resized[top:top + self.size, left:left + self.size])


@dataclasses.dataclass
class NormalizeImage(grain.transforms.Map):
  """uint8 [0, 255] -> float32 [-1, 1]."""

  def map(self, element: dict) -> dict:
    return element | dict(image=element["image"].astype(np.float32) / 127.5 - 1.0)


@dataclasses.dataclass
class Tokenize(grain.transforms.Map):
  """Replaces `caption` (str) by `text` (int32 [max_len])."""
  tokenizer: Tokenizer
  max_len: int

  def map(self, element: dict) -> dict:
    element = dict(element)
    element["text"] = self.tokenizer.encode(element.pop("caption"), self.max_len)
    return element
