"""mmjax: multimodal foundation models in JAX/Flax."""
__version__ = "0.1.0"


def load(path: str, base: str | None = None):
  """`model, params, tokenizer = mmjax.load(path)` from an export directory (`python -m mmjax.export`
  or `python -m mmjax.convert_checkpoint`), with `preprocess`, `encode_image`, `encode_text` and
  `image_size` on the result for a two-tower model (`mmjax.bundle.LoadedModel`); an adapter-only
  export needs `base`, the export of the model it adapts."""
  from mmjax import bundle  # Here, so `import mmjax` stays light.
  return bundle.load(path, base=base)
