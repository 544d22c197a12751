"""SigLIP 2 ViT-B/16 NaFlex: images at their own aspect ratio, up to 256 patches of 16 px each, with
SigLIP 2's multilingual 256k-token SentencePiece vocabulary; the ring sigmoid loss.

  python -m mmjax.train --config configs/siglip2_b16.py --workdir gs://bucket/siglip2_b16 \
      --config.data.captions=/data/webli/captions.jsonl --config.data.tokenizer=/data/gemma_256k.model

Data: captions JSONL (or CSV, webdataset or array_record shards) of images of any size, which keep
their aspect ratio (`data.max_patches` patches each, positions resized from a 16 x 16 grid). The
tokenizer is any SentencePiece `.model` given by path; the text tower embeds `vocab_size` (256,000,
big_vision's Gemma tokenizer) rows, so a smaller vocabulary needs `--config.model.text.vocab_size`.
Fine-tune a converted `google/siglip2-base-patch16-naflex` instead with `configs/finetune.py`.

Hardware: as `configs/siglip_b16.py`, 128 images per chip, so a 32k global batch on a TPU v5e-256.
The smallest slice compiled is a v5e-4 (`python -m mmjax.compile --config configs/siglip2_b16.py
--topology v5e:2x2`: 14.5 GiB of 16 per chip with `attention_impl=xla`, 17.3 with `pallas`; the
256k-row embedding and its optimizer state take 2.5 GiB more than `siglip_b16`'s). SigLIP 2's LocCa and
distillation losses (`configs/siglip2_shapes.py`) are not on here: LocCa's output layer over the 256k
vocabulary needs a chunked cross-entropy to fit, and neither has been compiled at this scale yet.
"""
from configs import siglip_b16

# big_vision's multilingual (Gemma) SentencePiece model: 256k pieces, pad 0, EOS 1.
VOCAB_SIZE, GEMMA_EOS_ID = 256_000, 1


def get_config(arg=None):
  c = siglip_b16.get_config(arg)
  c.model.image.update(naflex=True, posemb_grid=16)
  c.model.text.update(vocab_size=VOCAB_SIZE, eos_id=GEMMA_EOS_ID)
  c.data.max_patches = 256
  return c
