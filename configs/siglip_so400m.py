"""SigLIP So400m/14 at 224 px, sharded with FSDP: parameters and optimizer state split over `fsdp`.

  python -m mmjax.train --config configs/siglip_so400m.py --workdir gs://bucket/so400m \
      --config.data.captions=/data/webli/captions.jsonl --config.data.tokenizer=/data/spm32k.model

Hardware: 128 images per chip (`data.per_device_batch_size`; fsdp over all devices, scanned and
rematerialised layers, bf16 compute), so a 32k global batch on a TPU v5e-256 slice or 32 nodes
of 8x H100. The smallest slice compiled is a v5e-4 (`python -m mmjax.compile --config
configs/siglip_so400m.py --topology v5e:2x2`: 10.9 GiB of 16 per chip with
`attention_impl=pallas`). Not trained here; a test builds and lowers it.
"""
from mmjax.config import base_config, tower


def get_config(arg=None):
  c = base_config(arg)
  c.model.image = tower(variant="So400m/14", posemb="learn", pool="map", scan=True, remat_policy="full")
  c.model.text = tower(variant="So400m", vocab_size=32000, max_len=64, pool="last", causal=False, eos_id=2,
                       scan=True, remat_policy="full")
  c.model.embed_dim = 1152
  c.model.temperature_init, c.model.bias_init = 10.0, -10.0
  c.model.dtype = "bfloat16"
  c.loss.kind, c.loss.impl = "sigmoid", "ring"
  c.data.update(source="folder", image_size=224, per_device_batch_size=128, worker_count=16)
  c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1))
  c.optim.update(lr=1e-3, warmup_steps=5000, weight_decay=1e-4, b2=0.95)
  c.total_steps = 120_000
  c.checkpoint_every, c.eval_every, c.log_every = 2000, 0, 100
  c.evals = dict(batch_size=1024)
  return c
