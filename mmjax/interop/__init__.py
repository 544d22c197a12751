"""Load CLIP, SigLIP and SigLIP 2 checkpoints from open_clip, HF transformers and big_vision; export to HF.

Each converter returns `(model_config, params)`: `mmjax.models.build(model_config)` is the
module and `params` its parameters. Mismatched checkpoints raise `ConversionError` naming
every missing, unexpected or mis-shaped parameter.
"""
from mmjax.interop.big_vision import from_big_vision
from mmjax.interop.common import DEFAULT_MAX_PATCHES
from mmjax.interop.hf import from_hf, to_hf
from mmjax.interop.open_clip import from_open_clip

__all__ = ["from_open_clip", "from_hf", "from_big_vision", "to_hf", "DEFAULT_MAX_PATCHES"]
