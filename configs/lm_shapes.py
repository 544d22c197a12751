"""Text-only language model on the shapes questions, answers and captions: the frozen LM of the
small vision-language recipes, trained here first.

  python -m mmjax.train --config configs/lm_shapes.py --workdir runs/lm_shapes

A Llama-style decoder (RoPE, RMSNorm, gated MLP) over the `shapes_vlm` vocabulary, loss on every
token. Half of its records follow a description of their own scene ("scene: a red circle
question: what colour is the circle? answer: red", `data.described_fraction`), so it learns to
answer and caption from what precedes the prompt; the frozen-LM recipes (BLIP-2, Flamingo, LLaVA
stage 1) put the image there. Without images it can only learn the answers' prior: its VQA
accuracy is reported next to the majority-answer baseline, and `described_vqa` asks the same
questions after their scene's description. Measured on 2 CPU cores (2026-12-01): 3 min 42 s;
VQA exact match 0.328 (majority answer 0.180; count 0.61 from the question alone, colour 0.12,
shape 0.21); described 0.824 (count 1.00, colour 0.75, shape 0.83, relation 0.50).
"""
from mmjax.config import base_config, decoder, shapes_vqa_data


def get_config(arg=None):
  c = base_config(arg)
  c.task = "generative"
  c.model = dict(kind="lm", **decoder("shapes"))
  c.data = shapes_vqa_data(loss_on="all", max_len=72, described_fraction=0.5)
  c.optim.lr, c.optim.warmup_steps = 3e-3, 100
  c.total_steps = 1500
  c.checkpoint_every, c.eval_every, c.log_every = 500, 1500, 50
  c.evals = dict(batch_size=64, vqa=dict(n=256, max_new_tokens=4), described_vqa=dict(n=256, max_new_tokens=4))
  return c
