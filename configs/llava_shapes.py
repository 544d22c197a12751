"""LLaVA on the shapes questions and captions, on CPU.

  python -m mmjax.train --config configs/lm_shapes.py --workdir runs/lm_shapes      # the LM first
  python -m mmjax.train --config configs/llava_shapes.py --workdir runs/llava_shapes
  python -m mmjax.train --config configs/llava_shapes.py:stage=1 --workdir runs/llava_stage1
  python -m mmjax.train --config configs/llava_shapes.py:lora=True --workdir runs/llava_lora  # after stage 1
  python -m mmjax.train --config configs/llava_shapes.py:rag=True --workdir runs/llava_rag  # after make train + export

Arguments (`mmjax.config.parse_arg`; a bare `lora` or `rag` means True): `stage=2`, `lora=False`,
`rag=False`. A ViT (32 px, patch 8: 16 visual tokens per image), an `mlp2x_gelu` projector and the
decoder of `lm_shapes.py`, whose trained parameters start `lm` (`init_from`). The default is
LLaVA's stage 2 (projector, vision tower and LM trained; loss on answer tokens only); `stage=1`
trains the projector alone; `lora=True` is stage 2 from the stage-1 run with the vision tower and
LM frozen and LoRA (rank 8) on the LM's attention and MLP, the projector trained (LLaVA-1.5's LoRA
recipe). Measured on 2 CPU cores (2026-12-01, 1500 steps each, about 3 min 33 s each): stage 2
VQA exact match 0.609 (majority answer 0.180, text-only LM 0.328; colour 0.74, shape 0.42, count
0.76, relation 0.38), captions BLEU-4 0.302, CIDEr 2.72; `stage=1` 0.648 (CIDEr 1.85); `lora=True`
after it 0.793 (colour 0.86, shape 0.65, count 0.99, relation 0.46; CIDEr 3.07).

`rag=True` adds retrieval-augmented prompts (`mmjax.index.rag`): the two captions
of a pool of 8192 training scenes that the `make train` SigLIP export (runs/siglip_shapes_export:
`python -m mmjax.export --workdir runs/siglip_shapes --out runs/siglip_shapes_export`) finds
nearest each image come before its question or caption prompt, in training and evaluation.
Measured from the earlier `lm_shapes` (bare questions only; stage 2 from it: VQA 0.660, CIDEr
2.63): 8 min 7 s (96,000 records retrieved in 42 s; longer sequences); VQA 0.785 (colour 0.83,
shape 0.67, count 0.96, relation 0.50), captions BLEU-4 0.344, CIDEr 3.23.
"""
from mmjax.config import base_config, decoder, parse_arg, shapes_vqa_data, vision_layer
from mmjax.errors import ConfigError


def get_config(arg=None):
  args = parse_arg(arg, stage=2, lora=False, rag=False)
  if args.stage not in (1, 2):
    raise ConfigError(f"config argument stage={args.stage}: expected 1 (projector alone) or 2")
  if args.lora and args.stage == 1:
    raise ConfigError("config argument lora=True is stage 2 from the stage-1 run: it takes stage=2")
  c = base_config()
  c.task = "generative"
  c.model = dict(kind="llava", vision=dict(width=96, depth=2, mlp_dim=192, num_heads=4, patch_size=8,
                                           posemb="learn"),
                 lm=decoder("shapes"), projector="mlp2x_gelu", vision_layer=vision_layer(-1), image_size=32)
  c.data = shapes_vqa_data(max_len=56)  # 16 image tokens and up to 33 of text.
  c.init_from = (("lm", "runs/lm_shapes"),)
  if args.stage == 1:
    c.optim.frozen = (r"^vision/", r"^lm/")
  if args.lora:
    c.init_from = (("base", "runs/llava_stage1"),)
    c.adapt = dict(method="lora", targets=((r"^lm/.*(query|value|gate|up|down)/kernel$", 8),), alpha=16.0,
                   dropout=0.05, act="gelu")
    c.optim.frozen = (r"^base/vision/", r"^base/lm/")
  if args.rag:  # Two retrieved captions of up to 32 tokens each come before the prompt.
    c.data.max_len = 120
    c.data.rag = dict(retriever="runs/siglip_shapes_export", k=2, pool=8192, records=96_000, selection="retrieved")
  c.optim.lr, c.optim.warmup_steps = 3e-3, 100
  c.total_steps = 1500
  c.checkpoint_every, c.eval_every, c.log_every = 500, 1500, 50
  c.evals = dict(batch_size=64, vqa=dict(n=256, max_new_tokens=4), captioning=dict(n=64, max_new_tokens=20))
  return c
