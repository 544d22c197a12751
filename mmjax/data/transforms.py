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
from mmjax.errors import ConfigError


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
    crop = random_crop(element["image"], self.scale, self.ratio, rng)
    return element | dict(image=np.asarray(Image.fromarray(crop).resize((self.size, self.size), Image.BILINEAR)))


def random_crop(image: np.ndarray, scale: tuple[float, float], ratio: tuple[float, float],
                rng: np.random.Generator) -> np.ndarray:
  """A region of `scale` times the image's area with an aspect ratio log-uniform in `ratio`; after 10
  draws that do not fit, the centre square."""
  h, w = image.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
      break
  else:
    ch = cw = min(h, w)
    top, left = (h - ch) // 2, (w - cw) // 2
  return image[top:top + ch, left:left + cw]


@dataclasses.dataclass
class RandomLocalView(grain.transforms.RandomMap):
  """Adds `image_local`, a local view for self-distillation: a random crop of `scale` times the image's
  area (aspect ratio in 3/4..4/3) as a NaFlex tower's patches within `patches` (padded to them), or, with
  `patches` 0, resized to `size` x `size` in [-1, 1] for a fixed-resolution tower."""
  scale: tuple[float, float]
  size: int
  patch_size: int = 0
  patches: int = 0

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    crop = random_crop(element["image"], self.scale, (3 / 4, 4 / 3), rng)
    if self.patches:
      return element | dict(image_local=naflex_patches(crop, self.patch_size, self.patches, self.patches))
    return element | dict(image_local=prepare_image(crop, self.size))


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


def naflex_grid(height: int, width: int, patch_size: int, max_patches: int, max_scale: float = 100.0) -> tuple[int, int]:
  """(h, w) patches of an image resized NaFlex-style: both sides scaled by the largest s <= `max_scale`
  for which the patch grid, each side rounded up to whole patches (at least one), holds at most
  `max_patches`. The grid only changes where a side's patch count does, at s = k * patch / side, so
  those candidates are tried exactly (big_vision and HF Siglip2 bisect on s for the same answer)."""
  if max_patches < 1 or patch_size < 1 or min(height, width) < 1:
    raise ConfigError(f"NaFlex needs max_patches >= 1 and a non-empty image; got max_patches={max_patches}, "
                      f"patch_size={patch_size}, image {height}x{width}")
  best = (0.0, 1, 1)
  for side in (height, width):
    for k in range(1, max_patches + 1):
      if k * patch_size / side > max_scale:
        h, w, scale = -(-height * max_scale // patch_size), -(-width * max_scale // patch_size), max_scale
      else:  # Integer ceilings: at this scale one side is exactly k patches.
        h, w, scale = -(-height * k // side), -(-width * k // side), k * patch_size / side
      if h * w <= max_patches and scale > best[0]:
        best = (scale, int(h), int(w))
  return best[1], best[2]


@dataclasses.dataclass
class NaFlexPatches(grain.transforms.Map):
  """uint8 `image` [H, W, 3] -> dict(patches=float32 [max_patches, p * p * 3], grid=int32 [2]): the image
  resized at its own aspect ratio to the `naflex_grid` (PIL bilinear), scaled to [-1, 1], cut into
  patches row by row (each flattened row by row, channels last) and zero-padded to `max_patches`: the
  input of a NaFlex tower (`mmjax.models.vit.ViT(naflex=True)`), whatever the image's shape."""
  patch_size: int
  max_patches: int

  def map(self, element: dict) -> dict:
    return element | dict(image=naflex_patches(element["image"], self.patch_size, self.max_patches,
                                               self.max_patches))


@dataclasses.dataclass
class RandomBudgetPatches(grain.transforms.RandomMap):
  """`NaFlexPatches` within a patch budget drawn for each image from `budgets` (NaViT's resolution
  sampling), zero-padded to `length`: a model trained so takes every budget, and a batch of mixed
  sizes that `mmjax.data.packing.pack_images` packs."""
  patch_size: int
  budgets: tuple[int, ...]
  length: int

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    budget = int(self.budgets[rng.integers(len(self.budgets))])
    return element | dict(image=naflex_patches(element["image"], self.patch_size, budget, self.length))


def naflex_patches(image: np.ndarray, patch_size: int, budget: int, length: int) -> dict[str, np.ndarray]:
  """dict(patches=float32 [length, p * p * 3], grid=int32 [2]) of uint8 `image`: `NaFlexPatches` within
  `budget` patches, zero-padded to `length`."""
  p = patch_size
  h, w = naflex_grid(image.shape[0], image.shape[1], p, budget)
  resized = np.asarray(Image.fromarray(image).resize((w * p, h * p), Image.BILINEAR), np.float32) / 127.5 - 1.0
  padded = np.zeros((length, p * p * 3), np.float32)
  padded[:h * w] = resized.reshape(h, p, w, p, 3).transpose(0, 2, 1, 3, 4).reshape(h * w, p * p * 3)
  return dict(patches=padded, grid=np.array([h, w], np.int32))


@dataclasses.dataclass
class Tokenize(grain.transforms.Map):
  """Replaces `caption` (str) by `text` (int32 [max_len])."""
  tokenizer: Tokenizer
  max_len: int

  def map(self, element: dict) -> dict:
    element = dict(element)
    element["text"] = self.tokenizer.encode(element.pop("caption"), self.max_len)
    return element
