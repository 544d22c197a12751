"""Prompt learning (CoOp, CoCoOp, MaPLe, CoPrompt) on the frozen SigLIP of `make train`, base-to-novel.

  make train    # the backbone: runs/siglip_shapes
  python -m mmjax.train --config configs/prompt_shapes.py:method=coop --workdir runs/coop_shapes
  python -m mmjax.train --config configs/prompt_shapes.py:method=maple --workdir runs/maple_shapes

Argument (`mmjax.config.parse_arg`): `method=coop` (default), `cocoop`, `maple`, `coprompt`,
`template` (the zero-shot prompt "a photo of a <class>", nothing trained) or `lora` (that prompt
with LoRA on both towers' attention). The 48 colour x shape classes are split in half by
`data.split_seed`: 16 shots of each base class train the prompts; the test images of base classes
are classified among the base classes, those of novel classes among the novel ones (`base_acc`,
`novel_acc`, `hm`). `python -m mmjax.base_to_novel` runs every method over 3 shot seeds with zero-shot
and linear-probe rows; README "Adaptation" has the table.
"""
from configs import siglip_shapes
from mmjax.adapt.prompts import METHODS
from mmjax.config import parse_arg
from mmjax.errors import ConfigError


def get_config(arg=None):
  method = parse_arg(arg, method="coop").method
  if method not in METHODS + ("lora",):
    raise ConfigError(f"config argument method={method!r}: expected one of {METHODS + ('lora',)}")
  c = siglip_shapes.get_config()
  c.task = "prompt_learning"
  c.prompt = dict(method="template" if method == "lora" else method, num_context=4, init_words="a photo of a",
                  class_specific=False,
                  depth=1,  # The backbone's text tower has one block: MaPLe and CoPrompt prompt the input layer.
                  consistency=1.0 if method == "coprompt" else 0.0)
  c.data = dict(source="shapes_classes", tokenizer="shapes", image_size=64, batch_size=32, shots=16,
                base_fraction=0.5, split_seed=0, shot_seed=0, test_per_class=20, image_root="",
                on_bad_image="skip", seed=0, worker_count=0)
  c.init_from = (("base", "runs/siglip_shapes"),)
  c.optim.frozen = (r"^base/",)
  if method == "lora":  # CLIP-LoRA: the template's class prompts, rank-4 updates of both towers' attention.
    c.adapt = dict(method="lora", targets=((r"MultiHeadDotProductAttention_0/(query|key|value|out)/kernel$", 4),),
                   alpha=8.0, dropout=0.0, act="gelu")
  c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 2e-3, 20, 0.0
  c.total_steps = 200
  c.checkpoint_every, c.eval_every, c.log_every = 100, 200, 20
  c.evals = dict(batch_size=64)
  return c
