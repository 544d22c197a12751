"""A real captioned dataset that nobody here made: the UCI handwritten digits that scikit-learn
ships (1,797 8x8 greyscale images, offline), written in the formats users bring their own data in.

  python -m mmjax.data.digits --out data/digits

writes `train/<name>/<i>.png` with `train/captions.jsonl` ({"image", "caption"} a line, "a photo of
the digit seven.") and `test/<name>/<i>.png`: both are ImageFolders whose folder names are the
class names (a linear probe's train and test sets), and the captions are the training set. Images are upscaled (nearest) to `--size`
pixels, white digits on black as in the original; `--test_fraction` of each digit is held out,
chosen by `--seed`. Needs scikit-learn (the `dev` extra).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image

from mmjax import cli
from mmjax.errors import ConfigError

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATE = "a photo of the digit {}."


def write_digits(out: str, size: int = 32, test_fraction: float = 0.3, seed: int = 0) -> dict[str, int]:
  """Writes the dataset under `out`; returns the number of train and test images."""
  try:
    from sklearn.datasets import load_digits  # Optional: only this writer needs it.
  except ImportError as e:
    raise ConfigError("mmjax.data.digits needs scikit-learn: pip install scikit-learn") from e
  if not 0 < test_fraction < 1:
    raise ConfigError(f"--test_fraction={test_fraction}: expected a value in (0, 1)")
  digits = load_digits()
  images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # Values 0..16.
  rng = np.random.default_rng(seed)
  test = np.zeros(len(images), bool)
  for label in range(len(NAMES)):
    rows = np.flatnonzero(digits.target == label)
    test[rng.choice(rows, round(len(rows) * test_fraction), replace=False)] = True
  os.makedirs(os.path.join(out, "train"), exist_ok=True)
  with open(os.path.join(out, "train", "captions.jsonl"), "w", encoding="utf-8") as captions:
    for i, (image, label) in enumerate(zip(images, digits.target)):
      picture = Image.fromarray(image).resize((size, size), Image.NEAREST).convert("RGB")
      folder = os.path.join(out, "test" if test[i] else "train", NAMES[label])
      os.makedirs(folder, exist_ok=True)
      picture.save(os.path.join(folder, f"{i}.png"))
      if not test[i]:
        captions.write(json.dumps({"image": f"{NAMES[label]}/{i}.png", "caption": TEMPLATE.format(NAMES[label])})
                       + "\n")
  return {"train": int((~test).sum()), "test": int(test.sum())}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m mmjax.data.digits", description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--test_fraction", type=float, default=0.3)
  parser.add_argument("--seed", type=int, default=0)
  cli.add_verbose_flag(parser)
  args = parser.parse_args(argv)
  with cli.user_errors(args.verbose):
    counts = write_digits(args.out, args.size, args.test_fraction, args.seed)
  print(f"wrote {counts['train']} captioned training images and {counts['test']} test images in "
        f"{len(NAMES)} class folders under {args.out}")


if __name__ == "__main__":
  main()
