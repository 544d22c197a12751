"""LiT on shapes: the image tower of `make train`'s SigLIP locked, a new text tower trained to it.

  make train    # runs/siglip_shapes
  python -m mmjax.train --config configs/lit_shapes.py --workdir runs/lit_shapes

Locked-image tuning (Zhai et al. 2022): `img` starts from the SigLIP run and is frozen; the
text tower, t and b start fresh and learn the image tower's embedding space with the same
sigmoid loss and data. Measured on 2 CPU cores (2026-11-30): 600 steps, 270 s; zero-shot 0.376
seen / 0.410 held-out, retrieval R@1 0.287 / 0.318 (i2t / t2i), from a SigLIP run at 0.382 /
0.390 and 0.322 / 0.356 after its 1200 steps.
"""
from configs import siglip_shapes


def get_config(arg=None):
  c = siglip_shapes.get_config(arg)
  c.init_from = (("img", "runs/siglip_shapes", "img"),)
  c.optim.frozen = (r"^img/",)
  c.total_steps = 600
  c.checkpoint_every, c.eval_every = 200, 600
  return c
