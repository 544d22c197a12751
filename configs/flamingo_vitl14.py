"""Flamingo at OpenFlamingo-3B scale: CLIP ViT-L/14 (224 px), a 6-layer Perceiver Resampler with
64 latents, GATED XATTN-DENSE before every layer of a frozen 1B-parameter Llama-style decoder.

  python -m mmjax.train --config configs/flamingo_vitl14.py --workdir gs://bucket/flamingo \
      --config.data.tokenizer=/models/lm/tokenizer.model "--config.init_from=(('lm','/runs/lm_1b_mmjax'),)"

Hardware: 8x A100/H100 80 GB, or a TPU v5e-64 slice (the smallest v5e slice it fits at batch 256:
`python -m mmjax.compile --config configs/flamingo_vitl14.py --topology v5e:8x8` gives 6.4 GiB of
16 per chip with `attention_impl=pallas`; on a v5e-16 it needs 16.65). bf16 compute, FSDP over every
device, rematerialised vision and LM blocks, interleaved sequences of up to 5 images. The vision tower and the LM are frozen; perceiver and
cross-attention train. The pipeline only reads the synthetic `shapes_vqa` source so far
(interleaved web documents such as MMC4 need a source). Not run here; a test builds and lowers it.
"""
from mmjax.config import base_config, decoder, shapes_vqa_data


def get_config(arg=None):
  c = base_config(arg)
  c.task = "generative"
  c.model = dict(kind="flamingo", vision=dict(variant="L/14", pool="tok", pre_norm=True, act="quick_gelu", remat_policy="full"),
                 lm=decoder("llama-1b", remat_policy="full"),
                 perceiver=dict(depth=6, num_latents=64, num_heads=16, mlp_dim=4096, max_media=5),
                 cross_attn_every=1, xattn=dict(num_heads=16, mlp_dim=8192), dtype="bfloat16",
                 attention_impl="xla")
  c.data = shapes_vqa_data(image_size=224, batch_size=256, max_len=256, media_per_record=5, worker_count=16)
  c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1))
  c.optim.update(lr=1e-4, warmup_steps=1875, weight_decay=0.1)
  c.optim.frozen = (r"^vision/", r"^lm/")
  c.total_steps = 60_000
  c.checkpoint_every, c.eval_every, c.log_every = 1000, 0, 50
  c.evals = dict(batch_size=256)
  return c
