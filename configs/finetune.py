"""Fine-tune a two-tower export (a converted open_clip, HF or big_vision checkpoint, or a trained
run's export) on your own captioned images: the model, its image size (a NaFlex model's patch budget:
images of any size keep their aspect ratio) and its tokenizer come from the export.

  python -m mmjax.convert_checkpoint --from open_clip --source ViT-B-32.pt --model-config ViT-B-32 \
      --out exports/clip_b32
  python -m mmjax.train --config finetune:export=exports/clip_b32 --workdir runs/ft \
      --config.data.captions=data/caps.jsonl                  # JSONL or CSV, images beside it
  python -m mmjax.export --workdir runs/ft --out exports/clip_b32_ft

Arguments: `export` (required), `loss` (`softmax` or `sigmoid`; default the export's own: sigmoid
when it has a logit bias, as SigLIP, else softmax; sigmoid on a CLIP adds a bias starting at -10),
`lora` (rank-`rank` LoRA on both towers' attention with the export frozen, instead of training
every weight). The learning rate (1e-5 full, 1e-4 LoRA) suits pretrained ViT-B towers; images get
the user-data augmentation (`data.augment`). The shapes evals mean nothing on your data; every
`eval_every` steps the run benchmarks itself on the files you name instead (each skipped until set):

  --config.evals.imagenet.data=IMAGENET/val      # ImageFolder of synset folders: zero-shot top-1/5
  --config.evals.retrieval.data=dataset_coco.json --config.evals.retrieval.image_root=COCO_DIR
"""
import json
import os

import ml_collections

from mmjax.config import base_config, parse_arg
from mmjax.errors import ConfigError


def get_config(arg=None):
  a = parse_arg(arg, export="", loss="", lora=False, rank=8)
  path = os.path.join(a.export, "model_config.json")
  if not a.export or not os.path.isfile(path):
    raise ConfigError(f"finetune: export={a.export!r} is not an export directory (no {path}); give "
                      "finetune:export=DIR, the output of mmjax.convert_checkpoint or mmjax.export")
  with open(path, encoding="utf-8") as f:
    model = json.load(f)
  if "kind" in model or "adapt" in model:
    raise ConfigError(f"finetune: {a.export} holds a {model.get('kind') or 'adapted'} model; this recipe "
                      "fine-tunes a plain two-tower export")
  loss = a.loss or ("sigmoid" if model.get("bias_init") is not None else "softmax")
  if loss not in ("softmax", "sigmoid"):
    raise ConfigError(f"finetune: loss={loss!r}; expected softmax or sigmoid")
  c = base_config()
  image_size, max_patches = model.pop("image_size"), model.pop("max_patches", 0)
  if loss == "sigmoid" and model.get("bias_init") is None:
    model["bias_init"] = -10.0
  c.model = ml_collections.ConfigDict(model)
  c.loss.kind, c.loss.impl = loss, "ring" if loss == "sigmoid" else "all_gather"
  c.data.update(source="folder", tokenizer="from_init", image_size=image_size, batch_size=64)
  if max_patches:  # A NaFlex (SigLIP 2) tower: each image at its own aspect ratio, in the export's patch budget.
    c.data.max_patches = max_patches
  c.optim.update(lr=1e-5, warmup_steps=50, weight_decay=0.1)
  c.init_from = (("", a.export),)
  if a.lora:
    c.init_from = (("base", a.export),)
    c.adapt = dict(method="lora", targets=((r"MultiHeadDotProductAttention_0/(query|key|value|out)/kernel$", a.rank),),
                   alpha=2.0 * a.rank, dropout=0.0, act="gelu")
    c.optim.update(frozen=(r"^base/",), lr=1e-4, weight_decay=0.0)
  c.total_steps = 500
  c.checkpoint_every, c.eval_every, c.log_every = 100, 100, 10
  # Benchmarks on your files (mmjax.evals.benchmarks), skipped while their `data` is "".
  c.evals = dict(batch_size=256,
                 imagenet=dict(benchmark="zeroshot_classification", data="", classes="imagenet1k",
                               templates="clip_imagenet"),
                 retrieval=dict(benchmark="retrieval", data="", image_root="", split="test"))
  return c
