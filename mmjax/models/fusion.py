"""Fusion baselines: where an image-and-text classifier combines its two modalities.

Both inputs are encoded by their own tower (`model.image`, a ViT; `model.text`, a text
transformer; heads off), then:

- `early`: the towers' pooled features are concatenated and an MLP maps them to the logits
  (feature-level fusion).
- `cross` (model-level): in `fusion_depth` blocks the text tokens cross-attend to the image
  tokens (`CrossAttentionBlock`); the text's pooled token then gives the logits.
- `late`: one linear classifier per modality; their logits are averaged. Neither branch sees the
  other modality, so late fusion answers only what one modality decides alone.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.layers import dense
from mmjax.models.perceiver import CrossAttentionBlock
from mmjax.models.text import TextTransformer
from mmjax.models.towers import resolve_tower
from mmjax.models.vit import ViT

FUSIONS = ("early", "cross", "late")
# The keys a fusion model config needs besides its towers.
REQUIRED_KEYS = ("fusion", "num_classes", "fusion_depth", "fusion_heads", "fusion_mlp_dim")


class FusionClassifier(nn.Module):
  """`(image NHWC, text ids [batch, len]) -> logits [batch, num_classes]`."""
  fusion: str
  image: dict
  text: dict
  num_classes: int
  fusion_depth: int = 2
  fusion_heads: int = 4
  mlp_dim: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image, text, train=False):
    if self.fusion not in FUSIONS:
      raise ConfigError(f"model.fusion={self.fusion!r}: expected one of {FUSIONS}")
    pooled_only = self.fusion != "cross"  # Only cross-attention fusion reads every token.
    img, img_aux = ViT(**self.image, head="none", name="img")(image, train=train, pooled_only=pooled_only)
    txt, txt_aux = TextTransformer(**self.text, head="none", name="txt")(text, train=train, pooled_only=pooled_only)
    logits = lambda x, name: dense(self.num_classes, ("embed", None), name, self.dtype)(x)
    if self.fusion == "early":
      x = jnp.concatenate([img, txt], axis=-1)
      x = nn.gelu(dense(self.mlp_dim, ("embed", "mlp"), "fusion_mlp", self.dtype)(x))
      return logits(x, "classifier")
    if self.fusion == "late":
      return (logits(img, "img_classifier") + logits(txt, "txt_classifier")) / 2
    tokens, image_tokens = txt_aux["encoded"], img_aux["encoded"]
    if tokens.shape[-1] != image_tokens.shape[-1]:
      raise ConfigError(f"model.fusion='cross' needs equal tower widths; image {image_tokens.shape[-1]}, "
                        f"text {tokens.shape[-1]}")
    for i in range(self.fusion_depth):
      tokens = CrossAttentionBlock(self.fusion_heads, self.mlp_dim, self.dtype, name=f"fusion_{i}")(
          tokens, image_tokens, not train)
    return logits(tokens[:, -1], "classifier")


def build_fusion(cfg: Mapping[str, Any]) -> FusionClassifier:
  """A `FusionClassifier` from a model config: `image` and `text` towers (the text's `vocab_size` set)
  and REQUIRED_KEYS."""
  missing = [f"model.{k}" for k in REQUIRED_KEYS if cfg.get(k) is None]
  towers = {}
  for side in ("image", "text"):
    kw = resolve_tower(cfg, side)
    kw["dtype"] = jnp.dtype(kw["dtype"])
    kw.pop("head", None)
    towers[side] = kw
  if "vocab_size" not in towers["text"]:
    missing.append("model.text.vocab_size")
  if missing:
    raise ConfigError(f"missing required config key(s) {missing}")
  return FusionClassifier(cfg["fusion"], towers["image"], towers["text"], cfg["num_classes"],
                          fusion_depth=cfg["fusion_depth"], fusion_heads=cfg["fusion_heads"],
                          mlp_dim=cfg["fusion_mlp_dim"])
