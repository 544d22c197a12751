"""Text-only language model on the shapes questions, answers and captions: the frozen LM of the
small vision-language recipes, trained here first.

  python -m mmjax.train --config configs/lm_shapes.py --workdir runs/lm_shapes

A Llama-style decoder (RoPE, RMSNorm, gated MLP) over the `shapes_vlm` vocabulary, loss on every
token. Without images it can only learn the answers' prior: its VQA accuracy is reported next to
the majority-answer baseline. Measured on 2 CPU cores: 6 min 24 s; VQA exact match 0.332
(majority answer 0.180; count 0.61 from the question alone, colour 0.14, shape 0.20).
"""
from mmjax.config import base_config, shapes_decoder, shapes_vqa_data


def get_config(arg=None):
  c = base_config()
  c.task = "generative"
  c.model = dict(kind="lm", **shapes_decoder())
  c.data = shapes_vqa_data(loss_on="all", max_len=40)
  c.optim.lr, c.optim.warmup_steps = 3e-3, 100
  c.total_steps = 1500
  c.checkpoint_every, c.eval_every, c.log_every = 500, 1500, 50
  c.evals = dict(batch_size=64, vqa=dict(n=256, max_new_tokens=4))
  return c
