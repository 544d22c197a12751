"""Small configs shared by the tests: tiny towers that compile and train in seconds."""
from mmjax.config import tower
from configs import siglip_shapes


def tiny_config(**overrides):
  c = siglip_shapes.get_config()
  c.model.image = tower(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, posemb="learn", pool="map",
                        head="none")
  c.model.text = tower(vocab_size=None, max_len=16, width=32, depth=1, mlp_dim=64, num_heads=2,
                       pool="last", causal=False, eos_id=2)
  c.model.embed_dim = 32
  c.data.image_size = 32
  c.data.batch_size = 16
  c.optim.warmup_steps = 1
  c.total_steps = 4
  c.log_every, c.checkpoint_every, c.eval_every = 2, 2, 0
  c.evals.update(batch_size=64, zeroshot=dict(templates="shapes", per_class=2), retrieval=dict(n=64),
                 binding=dict(n=64))
  c.update(overrides)
  return c
