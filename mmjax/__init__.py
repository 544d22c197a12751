"""mmjax: multimodal foundation models in JAX/Flax."""
__version__ = "0.1.0"


def load(path: str, base: str | None = None):
  """`(model, params, tokenizer)` from a directory written by `python -m mmjax.export`; an
  adapter-only export needs `base`, the export of the model it adapts."""
  from mmjax.export import load as _load
  return _load(path, base=base)
