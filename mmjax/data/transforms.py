"""Per-example grain transforms on dict(image=uint8 [H, W, 3], caption=str, ...).

The random ones (training augmentation of user data, `augmentation_ops`) are grain RandomMaps: the
loader draws their generator from the seed and the record's global position, so a batch's
augmentation does not depend on the process count or on where a run resumed."""
import dataclasses
import math

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
class RandomResizedCrop(grain.transforms.RandomMap):
  """Inception-style crop, as open_clip trains: a region of `scale` times the image's area and an
  aspect ratio log-uniform in `ratio`, resized to size x size (PIL bilinear). After 10 draws that
  do not fit, the centre square."""
  size: int
  scale: tuple[float, float] = (0.9, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    image = element["image"]
    h, w = image.shape[:2]
    for _ in range(10):
      area = h * w * rng.uniform(*self.scale)
      aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
      cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
      if 0 < cw <= w and 0 < ch <= h:
        top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        break
    else:
      ch = cw = min(h, w)
      top, left = (h - ch) // 2, (w - cw) // 2
    crop = image[top:top + ch, left:left + cw]
    return element | dict(image=np.asarray(Image.fromarray(crop).resize((self.size, self.size), Image.BILINEAR)))


@dataclasses.dataclass
class RandomFlip(grain.transforms.RandomMap):
  """Mirrors the image left-right with probability 1/2."""

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    return element | dict(image=element["image"][:, ::-1]) if rng.random() < 0.5 else element


@dataclasses.dataclass
class ColourJitter(grain.transforms.RandomMap):
  """Brightness, contrast and saturation each scaled by a factor uniform in [1 - s, 1 + s], in that order."""
  strength: float

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    image = element["image"].astype(np.float32)
    brightness, contrast, saturation = rng.uniform(1 - self.strength, 1 + self.strength, size=3)
    image = image * brightness
    image = (image - image.mean()) * contrast + image.mean()
    grey = image @ np.array([0.299, 0.587, 0.114], np.float32)
    image = (image - grey[..., None]) * saturation + grey[..., None]
    return element | dict(image=np.clip(np.rint(image), 0, 255).astype(np.uint8))


def augmentation_ops(augment_config, image_size: int) -> list:
  """The training image ops of `data.augment` (uint8 in, size x size uint8 out): a random resized
  crop (or, `crop_scale` None, the centre crop), then an optional flip and colour jitter."""
  scale = augment_config.get("crop_scale")
  ops = [RandomResizedCrop(image_size, tuple(scale)) if scale else ResizeImage(image_size)]
  if augment_config.get("flip"):
    ops.append(RandomFlip())
  if augment_config.get("colour_jitter"):
    ops.append(ColourJitter(float(augment_config.colour_jitter)))
  return ops


@dataclasses.dataclass
class NormalizeImage(grain.transforms.Map):
  """uint8 [0, 255] -> float32 [-1, 1]."""

  def map(self, element: dict) -> dict:
    return element | dict(image=element["image"].astype(np.float32) / 127.5 - 1.0)


def prepare_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] of any size -> the model's float32 [size, size, 3] input, as training prepares files."""
  return NormalizeImage().map(ResizeImage(size).map({"image": image}))["image"]


@dataclasses.dataclass
class Tokenize(grain.transforms.Map):
  """Replaces `caption` (str) by `text` (int32 [max_len])."""
  tokenizer: Tokenizer
  max_len: int

  def map(self, element: dict) -> dict:
    element = dict(element)
    element["text"] = self.tokenizer.encode(element.pop("caption"), self.max_len)
    return element
