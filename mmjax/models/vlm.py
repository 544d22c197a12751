"""Vision-language models behind one interface: Flamingo, LLaVA and BLIP-2.

Each is built from `config.model` (`kind` plus its own keys) and is called as
`model.apply(v, images [B, M, H, W, 3] or None, tokens [B, L], mask=, cache=, train=)`
-> `(logits [B, L, vocab], aux)`, with `init_cache(batch, max_len)` for generation
(`mmjax.generate.generate(..., images=)`). The vision tower is named "vision" and the
language model "lm" (a `Decoder`'s parameter tree), so freezing and `init_from` work by name.
In the token sequence, each image is `tokens_per_image(model)` copies of the image token.
"""
from __future__ import annotations

from typing import Any, Mapping

from mmjax.errors import ConfigError
from mmjax.models.flamingo import Flamingo, build_flamingo
from mmjax.models.llava import build_llava
from mmjax.models.qformer import build_blip2

BUILDERS = {"flamingo": build_flamingo, "llava": build_llava, "blip2": build_blip2}


def build(kind: str, model_config: Mapping[str, Any]):
  if kind not in BUILDERS:
    raise ConfigError(f"model.kind={kind!r}; known: {sorted(BUILDERS)} (or 'lm' for a text-only decoder)")
  return BUILDERS[kind](model_config)


def tokens_per_image(model) -> int:
  """Flamingo marks an image with one token; LLaVA and BLIP-2 with a run their features overwrite."""
  return 1 if isinstance(model, Flamingo) else model.num_image_tokens
