"""SigLIP ViT-B/16 at 256 px with the ring sigmoid loss, big_vision's SigLIP recipe shape.

Data and tokenizer as in configs/clip_b32.py (captions JSONL + a 32k sentencepiece model):

  python -m mmjax.train --config configs/siglip_b16.py --workdir gs://bucket/siglip_b16 \
      --config.data.captions=/data/webli/captions.jsonl --config.data.tokenizer=/data/spm32k.model

Hardware: 128 images per chip (`data.per_device_batch_size`), so a 32k global batch on a TPU
v5e-256 slice. The smallest slice compiled is a v5e-4 (`python -m mmjax.compile --config
configs/siglip_b16.py --topology v5e:2x2`: 12.0 GiB of 16 per chip with `attention_impl=xla`,
15.5 with `pallas`). On GPUs, 8 nodes of 8x H100. The ring loss keeps per-device loss memory
at O(b^2) for b = batch / devices.
"""
from mmjax.config import base_config, tower


def get_config(arg=None):
  c = base_config(arg)
  c.model.image = tower(variant="B/16", posemb="learn", pool="map", scan=True, remat_policy="dots_no_batch")
  c.model.text = tower(variant="B", vocab_size=32000, max_len=64, pool="last", causal=False, eos_id=2,
                       scan=True, remat_policy="dots_no_batch")
  c.model.embed_dim = 768
  c.model.temperature_init, c.model.bias_init = 10.0, -10.0
  c.model.dtype = "bfloat16"
  c.loss.kind, c.loss.impl = "sigmoid", "ring"
  c.data.update(source="folder", image_size=256, per_device_batch_size=128, worker_count=16)
  c.optim.update(lr=1e-3, warmup_steps=5000, weight_decay=1e-4, b2=0.95)
  c.total_steps = 120_000
  c.checkpoint_every, c.eval_every, c.log_every = 2000, 0, 100
  c.evals = dict(batch_size=1024)
  return c
