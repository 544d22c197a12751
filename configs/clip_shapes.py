"""CLIP (softmax loss, causal text tower pooled at end-of-text) on procedural shapes.

  python -m mmjax.train --config configs/clip_shapes.py --workdir runs/clip_shapes

Same tiny towers as siglip_shapes, CLIP's loss and text conventions; a few minutes on
a 2-core CPU.
"""
from mmjax.config import base_config, tower


def get_config(arg=None):
  c = base_config(arg)
  c.model.image = tower(width=96, depth=2, mlp_dim=192, num_heads=4, patch_size=8, posemb="learn", pool="tok")
  c.model.text = tower(vocab_size=None, max_len=32, width=96, depth=1, mlp_dim=192, num_heads=4,
                       pool="eos", causal=True, eos_id=2)
  c.model.embed_dim = 96
  c.model.temperature_init, c.model.bias_init = 1 / 0.07, None
  c.loss.kind, c.loss.impl = "softmax", "all_gather"
  c.optim.lr, c.optim.warmup_steps = 2e-3, 100
  c.total_steps = 1500
  c.checkpoint_every, c.eval_every, c.log_every = 250, 750, 50
  return c
