"""mmjax: multimodal foundation models in JAX/Flax."""
__version__ = "0.1.0"


def load(path: str):
  """`(model, params, tokenizer)` from a directory written by `python -m mmjax.export`."""
  from mmjax.export import load as _load
  return _load(path)
