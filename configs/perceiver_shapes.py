"""Perceiver IO as an image classifier of the 48 colour x shape classes (supervised, shapes data).

  python -m mmjax.train --config configs/perceiver_shapes.py --workdir runs/perceiver_shapes
  python -m mmjax.train --config configs/perceiver_shapes.py:kind=vit --workdir runs/vit_classify_shapes

The 64 px image enters as 256 inputs (4 x 4 pixel patches with 2-D Fourier position features);
32 latents read them by cross-attention, twice (the second iteration's weights shared), each
followed by two latent self-attention blocks; one output query decodes the logits. Argument
(`mmjax.config.parse_arg`): `kind=perceiver_io` (default), or `kind=vit`, which trains the ViT of
`make train`'s image tower with a dense head instead, for comparison. CPU, a few minutes; README
"Results" has the measured accuracies.
"""
from mmjax.config import base_config, parse_arg, tower
from mmjax.errors import ConfigError
from mmjax.models.classifier import KINDS

PERCEIVER = dict(num_latents=32, width=64, num_iterations=2, self_attention_depth=2, num_heads=4, cross_heads=1,
                 mlp_dim=128, share_weights=True)


def get_config(arg=None):
  kind = parse_arg(arg, kind="perceiver_io").kind
  if kind not in KINDS:
    raise ConfigError(f"config argument kind={kind!r}: expected one of {KINDS}")
  c = base_config()
  c.task = "classification"
  if kind == "perceiver_io":
    c.model = dict(kind=kind, patch_size=4, num_bands=8, perceiver=PERCEIVER, dtype="float32", attention_impl="xla")
  else:
    c.model = dict(kind=kind, image=tower(width=96, depth=2, mlp_dim=192, num_heads=4, patch_size=8, posemb="learn",
                                          pool="map"), dtype="float32", attention_impl="xla", norm_eps=1e-6)
  c.data = dict(source="shapes_labels", image_size=64, batch_size=64, seed=0, worker_count=0)
  c.optim.lr, c.optim.warmup_steps = 2e-3, 100
  c.total_steps = 1000
  c.checkpoint_every, c.eval_every, c.log_every = 500, 500, 50
  c.evals = dict(batch_size=240, per_class=20)
  return c
