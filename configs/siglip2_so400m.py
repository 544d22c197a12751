"""SigLIP 2 So400m/16 NaFlex: images at their own aspect ratio, up to 256 patches of 16 px each, with
SigLIP 2's multilingual 256k-token SentencePiece vocabulary; weights and optimizer state sharded over
`fsdp`, as `configs/siglip_so400m.py`.

  python -m mmjax.train --config configs/siglip2_so400m.py --workdir gs://bucket/siglip2_so400m \
      --config.data.captions=/data/webli/captions.jsonl --config.data.tokenizer=/data/gemma_256k.model

Data and tokenizer as `configs/siglip2_b16.py`. Hardware: 128 images per chip, so a 32k global batch
on a TPU v5e-256. The smallest slice compiled is a v5e-4 (`python -m mmjax.compile --config
configs/siglip2_so400m.py --topology v5e:2x2`: 12.1 GiB of 16 per chip with `attention_impl=xla`).
SigLIP 2's LocCa and distillation losses (`configs/siglip2_shapes.py`) are not on here: LocCa's
output layer over the 256k vocabulary needs a chunked cross-entropy to fit, and neither has been
compiled at this scale yet.
"""
from configs import siglip_so400m
from configs.siglip2_b16 import GEMMA_EOS_ID, VOCAB_SIZE


def get_config(arg=None):
  c = siglip_so400m.get_config(arg)
  c.model.image.update(variant="So400m/16", naflex=True, posemb_grid=16)
  c.model.text.update(vocab_size=VOCAB_SIZE, eos_id=GEMMA_EOS_ID)
  c.data.max_patches = 256
  return c
