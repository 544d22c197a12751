"""SigLIP 2 on procedural shapes, every loss on: a NaFlex image tower trained with the sigmoid loss,
LocCa's decoder loss and, for the last 20% of training, self-distillation and masked prediction from
an EMA teacher, on scenes drawn at several aspect ratios.

  python -m mmjax.train --config siglip2_shapes --workdir runs/siglip2_shapes
  python -m mmjax.train --config siglip2_shapes:locca=False,distill=False --workdir runs/s2_sigmoid  # ablations
  python -m mmjax.train --config siglip2_shapes:distill=False --workdir runs/s2_locca
  python -m mmjax.train --config siglip2_shapes:naflex=False,locca=False,distill=False --workdir runs/s2_square

Training scenes are 1:2, 1:1 or 2:1 (width:height, shorter side 64 px). The NaFlex tower takes each
whole, within `max_patches` (64) patches of 8 px, its budget drawn from 16, 36 and 64, packed 4 images
to a row; `naflex=False` is the fixed-resolution ablation, whose 64 px square tower sees the centre crop,
as CLIP-style preprocessing gives it. LocCa (`locca`, `mmjax.data.locca`): a one-block decoder reads each
image's patch features and is trained to caption it, to give the box of "the red circle" and to name
the object in a box; it is dropped from the export. Distillation (`distill`, `loss.distill`): the
student matches the teacher's embedding from a local view and its patch features at masked patches.

Evals: zero-shot, retrieval and binding as the default recipe; `aspect`, zero-shot over all 48 classes
at each aspect ratio and patch budget (`aspect/acc_r2_p36`: 2:1 images at 36 patches); `dense`, the mIoU
of a ridge probe on the frozen patch features predicting each patch's class (`mmjax.evals.dense`);
`grounding`, accuracy@IoU>=0.5 of the boxes LocCa's decoder gives for "the <colour> <shape>", with
the centre-box baseline's. README "SigLIP 2 on shapes" has the measured table.
"""
from configs import siglip_shapes
from mmjax.config import parse_arg

ASPECT_RATIOS = (0.5, 1.0, 2.0)


def get_config(arg=None):
  a = parse_arg(arg, naflex=True, max_patches=64, locca=True, distill=True)
  c = siglip_shapes.get_config(f"max_patches={a.max_patches}" if a.naflex else None)
  c.data.aspect_ratios = ASPECT_RATIOS
  c.total_steps = 2000  # With every loss on, 15 minutes on 2 CPU cores (README).
  budgets = (16, 36, a.max_patches)
  if a.naflex:
    c.data.update(patch_budgets=budgets, pack_images=True, images_per_row=4)
  c.evals.aspect = dict(ratios=ASPECT_RATIOS, budgets=budgets if a.naflex else (), per_class=5, templates="shapes")
  c.evals.dense = dict(n_train=256, n_test=128, l2=1e-3)
  if a.locca:
    c.model.locca = dict(width=96, depth=1, mlp_dim=192, num_heads=4, max_len=40, box_bins=32)
    c.loss.decoder_weight = 1.0
    c.evals.grounding = dict(n=256)
  if a.distill:
    c.loss.distill.update(weight=1.0, masked_weight=1.0)
  return c
