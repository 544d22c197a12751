"""CLIP ViT-B/32 at 224 px on web image-text pairs (CC12M / LAION subsets), open_clip's recipe shape.

Data: img2dataset output converted to a captions JSONL (`{"image": path, "caption": text}`),
and a sentencepiece tokenizer trained on those captions:

  python -m mmjax.data.tokenizer train --source captions --captions /data/cc12m/captions.jsonl \
      --out /data/cc12m/spm32k.model --vocab_size 32000
  python -m mmjax.train --config configs/clip_b32.py --workdir gs://bucket/clip_b32 \
      --config.data.captions=/data/cc12m/captions.jsonl --config.data.image_root=/data/cc12m \
      --config.data.tokenizer=/data/cc12m/spm32k.model

Hardware: 128 images per chip (`data.per_device_batch_size`, pure data parallelism, bf16
compute), so a 32k global batch on a TPU v5e-256 slice or 4 nodes of 8x A100/H100. The smallest
slice compiled is a v5e-4 (`python -m mmjax.compile --config configs/clip_b32.py --topology
v5e:2x2`: 9.9 GiB of 16 per chip with `attention_impl=pallas`). Not trained here.
"""
from mmjax.config import base_config, tower


def get_config(arg=None):
  c = base_config(arg)
  c.model.image = tower(variant="B/32", posemb="learn", pool="tok", act="gelu")
  c.model.text = tower(vocab_size=32000, max_len=77, width=512, depth=12, mlp_dim=2048, num_heads=8,
                       pool="eos", causal=True, eos_id=2, act="gelu")
  c.model.embed_dim = 512
  c.model.temperature_init, c.model.bias_init = 1 / 0.07, None
  c.model.dtype = "bfloat16"
  c.loss.kind, c.loss.impl = "softmax", "all_gather"
  c.data.update(source="folder", image_size=224, per_device_batch_size=128, worker_count=16)
  c.optim.update(lr=5e-4, warmup_steps=2000, weight_decay=0.2, b2=0.98)
  c.total_steps = 100_000
  c.checkpoint_every, c.eval_every, c.log_every = 2000, 0, 100
  c.evals = dict(batch_size=1024)
  return c
