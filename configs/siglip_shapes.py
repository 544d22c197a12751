"""SigLIP on procedural shapes: the default recipe of `make train`.

  python -m mmjax.train --config configs/siglip_shapes.py --workdir runs/siglip_shapes

A tiny ViT (64 px, patch 8) and text transformer trained with the ring sigmoid loss on
CPU. The image tower has a dense projection after its MAP head (big_vision's `img/head`):
without it the image embeddings learn shape far more slowly (README "Results"), so this
recipe exports to big_vision's layout but not to HF `SiglipModel`, whose image tower has none.
See README "Results" for the measured time and accuracies on a 2-core CPU.

Argument `max_patches=N` (`--config siglip_shapes:max_patches=64`) makes the image tower NaFlex
(SigLIP 2): images at their own aspect ratio, up to N patches each, positions on an 8 x 8 grid.
"""
from mmjax.config import base_config, parse_arg, tower


def get_config(arg=None):
  max_patches = parse_arg(arg, max_patches=0).max_patches
  c = base_config()
  c.model.image = tower(width=96, depth=2, mlp_dim=192, num_heads=4, patch_size=8, posemb="learn", pool="map",
                        head="dense")
  if max_patches:
    c.model.image.update(naflex=True, posemb_grid=8)
    c.data.max_patches = max_patches
  c.model.text = tower(vocab_size=None, max_len=32, width=96, depth=1, mlp_dim=192, num_heads=4,
                       pool="last", causal=False, eos_id=2)
  c.model.embed_dim = 96
  c.model.temperature_init, c.model.bias_init = 10.0, -10.0
  c.loss.kind, c.loss.impl = "sigmoid", "ring"
  c.optim.lr, c.optim.warmup_steps = 2e-3, 100
  # 2000 steps left shape half-learned on some seeds (README "Results"); 3000 fit in `make train`'s 10 minutes.
  c.total_steps = 3000
  c.checkpoint_every, c.eval_every, c.log_every = 200, 1000, 50
  return c
