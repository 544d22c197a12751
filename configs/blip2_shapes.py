"""BLIP-2 on the shapes questions and captions, on CPU.

  python -m mmjax.train --config configs/lm_shapes.py --workdir runs/lm_shapes      # the LM first
  python -m mmjax.train --config configs/blip2_shapes.py --workdir runs/blip2_shapes

A ViT (32 px, patch 8), a Q-Former whose 8 learned queries cross-attend to the image tokens,
and a linear projection of the queries into the frozen decoder of `lm_shapes.py` (`init_from`);
loss on answer tokens only. Measured on 2 CPU cores (2026-12-01): 3 min 43 s; VQA exact match
0.648 (majority answer 0.180, text-only LM 0.328; colour 0.79, shape 0.30, count 0.93, relation
0.50), captions BLEU-4 0.235, CIDEr 2.00. Frozen in front of an LM trained on bare questions
only, the 8 query tokens did not move its answers: 0.328, against that LM's own 0.332.
"""
from mmjax.config import base_config, decoder, shapes_vqa_data


def get_config(arg=None):
  c = base_config(arg)
  c.task = "generative"
  c.model = dict(kind="blip2", vision=dict(width=96, depth=2, mlp_dim=192, num_heads=4, patch_size=8,
                                           posemb="learn"),
                 lm=decoder("shapes"), qformer=dict(depth=2, num_queries=8, width=96, num_heads=4, mlp_dim=192,
                                                   cross_attention_every=1))
  c.data = shapes_vqa_data(max_len=48)  # 8 query tokens and up to 33 of text.
  c.init_from = (("lm", "runs/lm_shapes"),)
  c.optim.frozen = (r"^lm/",)
  c.optim.lr, c.optim.warmup_steps = 3e-3, 100
  c.total_steps = 1500
  c.checkpoint_every, c.eval_every, c.log_every = 500, 1500, 50
  c.evals = dict(batch_size=64, vqa=dict(n=256, max_new_tokens=4), captioning=dict(n=64, max_new_tokens=20))
  return c
