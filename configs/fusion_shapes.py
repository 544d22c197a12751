"""Fusion baselines on shapes VQA as classification over the 19 answers: early, model-level (cross) or late.

  python -m mmjax.train --config configs/fusion_shapes.py:fusion=early --workdir runs/fusion_early
  python -m mmjax.train --config configs/fusion_shapes.py:fusion=cross --workdir runs/fusion_cross
  python -m mmjax.train --config configs/fusion_shapes.py:fusion=late --workdir runs/fusion_late

Argument (`mmjax.config.parse_arg`): `fusion=cross` (default), `early` or `late`.

The same towers in all three (a ViT as in `make train`'s image tower, a one-block text transformer
reading the question); only where the modalities meet changes (`mmjax.models.fusion`). Trained
from scratch on CPU in a few minutes each; README "Results" has the accuracy per question type.
"""
from mmjax.config import base_config, parse_arg, tower
from mmjax.errors import ConfigError
from mmjax.models.fusion import FUSIONS


def get_config(arg=None):
  fusion = parse_arg(arg, fusion="cross").fusion
  if fusion not in FUSIONS:
    raise ConfigError(f"config argument fusion={fusion!r}: expected one of {FUSIONS}")
  c = base_config()
  c.task = "fusion"
  c.model = dict(fusion=fusion, fusion_depth=2, fusion_heads=4, fusion_mlp_dim=192,
                 image=tower(width=96, depth=2, mlp_dim=192, num_heads=4, patch_size=8, posemb="learn", pool="map"),
                 text=tower(width=96, depth=1, mlp_dim=192, num_heads=4, pool="last", causal=False),
                 dtype="float32", attention_impl="xla", norm_eps=1e-6)
  c.data = dict(source="shapes_vqa_labels", tokenizer="shapes_vlm", image_size=64, batch_size=64, max_len=24,
                held_out_fraction=0.2, seed=0, worker_count=0)
  c.optim.lr, c.optim.warmup_steps = 2e-3, 100
  c.total_steps = 1500
  c.checkpoint_every, c.eval_every, c.log_every = 500, 1500, 50
  c.evals = dict(batch_size=128, n=512)
  return c
