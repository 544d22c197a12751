"""SigLIP 2 on procedural shapes: the default recipe's towers with a NaFlex image tower, trained on
scenes drawn at several aspect ratios, and evaluated for robustness to aspect ratio and patch budget.

  python -m mmjax.train --config siglip2_shapes --workdir runs/siglip2_shapes
  python -m mmjax.train --config siglip2_shapes:naflex=False --workdir runs/siglip2_shapes_square

Training scenes are 1:2, 1:1 or 2:1 (width:height, shorter side 64 px). The NaFlex tower takes each
whole, within `max_patches` (64) patches of 8 px; `naflex=False` is the fixed-resolution ablation, whose
64 px square tower sees the centre crop, as CLIP-style preprocessing gives it. The `aspect` eval reports
zero-shot accuracy over all 48 classes at each aspect ratio (`aspect/acc_r2_p36`: 2:1 images at a
36-patch budget), and the `dense` eval the mIoU of a ridge probe on the frozen patch features that
predicts each patch's class (`mmjax.evals.dense`). README "SigLIP 2 on shapes" has the measured table.
"""
from configs import siglip_shapes
from mmjax.config import parse_arg

ASPECT_RATIOS = (0.5, 1.0, 2.0)


def get_config(arg=None):
  a = parse_arg(arg, naflex=True, max_patches=64)
  c = siglip_shapes.get_config(f"max_patches={a.max_patches}" if a.naflex else None)
  c.data.aspect_ratios = ASPECT_RATIOS
  budgets = (16, 36, a.max_patches)
  if a.naflex:
    c.data.update(patch_budgets=budgets, pack_images=True, images_per_row=4)
  c.evals.aspect = dict(ratios=ASPECT_RATIOS, budgets=budgets if a.naflex else (), per_class=5, templates="shapes")
  c.evals.dense = dict(n_train=256, n_test=128, l2=1e-3)
  return c
