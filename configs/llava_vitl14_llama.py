"""LLaVA-1.5 at scale: CLIP ViT-L/14 at 336 px (penultimate layer, no class token), mlp2x_gelu
projector, a Llama-2-7B-shaped decoder, sharded with FSDP over every device.

  python -m mmjax.train --config configs/llava_vitl14_llama.py --workdir gs://bucket/llava \
      --config.data.tokenizer=/models/llama2/tokenizer.model \
      "--config.init_from=(('lm','/runs/llama2_7b_mmjax'),)"

Hardware: 8x H100 80 GB (one node) or a TPU v5p-64 slice (`python -m mmjax.compile --config
configs/llava_vitl14_llama.py --topology v5p:4x4x4`: 21.1 GiB of 95 per chip with
`attention_impl=pallas`; a v5e-64 runs out, with 17.8 GiB of temporaries); bf16 compute, batch
128, rematerialised vision and LM blocks. Start `lm` from converted Llama weights
(`mmjax.interop.hf_lm.from_hf_lm`) and `vision` from a converted CLIP ViT-L/14-336. Argument
(`mmjax.config.parse_arg`): `stage=2` (default) trains the projector and the LM, `stage=1`
(`--config configs/llava_vitl14_llama.py:stage=1`) the projector alone. The pipeline only reads
the synthetic `shapes_vqa` source so far: instruction data (LLaVA-Instruct) needs a source of
image / prompt / answer records. Not run here; a test builds and lowers it.
"""
from mmjax.config import base_config, decoder, parse_arg, shapes_vqa_data, vision_layer
from mmjax.errors import ConfigError


def get_config(arg=None):
  stage = parse_arg(arg, stage=2).stage
  if stage not in (1, 2):
    raise ConfigError(f"config argument stage={stage}: expected 1 (projector alone) or 2")
  c = base_config()
  c.task = "generative"
  c.model = dict(kind="llava", vision=dict(variant="L/14", pool="tok", pre_norm=True, act="quick_gelu", remat_policy="full"),
                 lm=decoder("llama2-7b", remat_policy="full"),
                 projector="mlp2x_gelu", vision_layer=vision_layer(-2), vision_class_token=False, image_size=336,
                 dtype="bfloat16", attention_impl="xla")
  c.data = shapes_vqa_data(image_size=336, batch_size=128, max_len=640, worker_count=16)  # 576 image tokens.
  c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1))
  c.optim.update(lr=2e-5, warmup_steps=150, weight_decay=0.0)
  c.optim.frozen = (r"^vision/", r"^lm/") if stage == 1 else (r"^vision/",)
  c.total_steps = 5200
  c.checkpoint_every, c.eval_every, c.log_every = 500, 0, 10
  c.evals = dict(batch_size=128)
  return c
