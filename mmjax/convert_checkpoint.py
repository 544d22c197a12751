"""Convert open_clip, HF transformers or big_vision checkpoints into an mmjax export directory.

  python -m mmjax.convert_checkpoint --from open_clip --source open_clip_pytorch_model.bin \\
      --model-config ViT-B-32 --out exports/vit_b32
  python -m mmjax.convert_checkpoint --from hf --source ./siglip-base-patch16-224 --out exports/siglip_b16
  python -m mmjax.convert_checkpoint --from big_vision --source webli_en_b16_224.npz \\
      --tokenizer c4_en.model --out exports/siglip_b16
  python -m mmjax.convert_checkpoint --from hf --source ./siglip2-base-patch16-naflex --max-patches 256 \\
      --out exports/siglip2_b16_naflex

`mmjax.load(out)` then returns `(model, params, tokenizer)`. PyTorch files are read with
safetensors or `torch.load(weights_only=True)`, never as arbitrary pickles; nothing is
downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Sequence

from mmjax import bundle, cli, interop
from mmjax.data.clip_bpe import ClipBpeTokenizer
from mmjax.data.tokenizer import Tokenizer
from mmjax.errors import ConversionError

SOURCES = ("open_clip", "hf", "big_vision")
CLIP_BPE = "clip_bpe"
OPENAI_VOCAB_SIZE = 49408


def load_torch_state_dict(path: str | os.PathLike) -> dict:
  """A state dict from `.safetensors` or a torch file loaded with `weights_only=True`.

  Training checkpoints (`{"state_dict": ...}`, DDP's `module.` prefix) are unwrapped.
  """
  path = Path(path)
  if not path.is_file():
    raise ConversionError(f"--source {path}: no such file")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file
    return load_file(str(path))
  import torch
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for foreign files.
    raise ConversionError(f"{path}: not a torch state dict loadable with weights_only=True ({e})") from e
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ConversionError(f"{path}: expected a state dict, got {type(obj).__name__}")
  if obj and all(k.startswith("module.") for k in obj):
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
  return obj


def open_clip_model_config(spec: str | None) -> dict:
  """An open_clip model-config dict from a JSON file or, with open_clip installed, a model name."""
  if not spec:
    raise ConversionError("--from open_clip needs --model-config: a model-config JSON file or an open_clip "
                          "model name such as ViT-B-32")
  if Path(spec).is_file():
    try:
      return json.loads(Path(spec).read_text())
    except json.JSONDecodeError as e:
      raise ConversionError(f"--model-config {spec}: not valid JSON ({e})") from e
  try:
    import open_clip
  except ImportError:
    raise ConversionError(f"--model-config {spec!r} is not a file, and open_clip is not installed to look it "
                          "up by name") from None
  cfg = open_clip.get_model_config(spec)
  if cfg is None:
    raise ConversionError(f"--model-config {spec!r}: neither a file nor an open_clip model name")
  return cfg


def _hf_checkpoint(directory: str) -> tuple[dict, dict]:
  """(state dict, config dict) of a `save_pretrained` directory."""
  d = Path(directory)
  if not (d / "config.json").is_file():
    raise ConversionError(f"--source {d}: expected a HF model directory with config.json")
  weights = [d / n for n in ("model.safetensors", "pytorch_model.bin") if (d / n).is_file()]
  if not weights:
    raise ConversionError(f"--source {d}: no model.safetensors or pytorch_model.bin "
                          "(sharded checkpoints: merge them first)")
  return load_torch_state_dict(weights[0]), json.loads((d / "config.json").read_text())


def make_tokenizer(spec: str | None, model_config: dict, source_kind: str, source_dir: str | None = None):
  """`--tokenizer`: 'clip_bpe' (open_clip's vocabulary) or a SentencePiece `.model` (SigLIP rules).

  Without it: CLIP BPE for OpenAI's 49408-token vocabulary, or a `spiece.model` next to
  a HF checkpoint. SentencePiece models pad with EOS; text is cleaned as HF's
  SiglipTokenizer does for HF checkpoints, and lower-cased as in big_vision's training
  otherwise.
  """
  vocab = model_config["text"]["vocab_size"]
  if spec is None:
    if vocab == OPENAI_VOCAB_SIZE:
      spec = CLIP_BPE
    elif source_dir and (Path(source_dir) / "spiece.model").is_file():
      spec = str(Path(source_dir) / "spiece.model")
    else:
      raise ConversionError(f"cannot tell the tokenizer of a {vocab}-token vocabulary: pass --tokenizer "
                            "(clip_bpe or a SentencePiece .model file)")
  if spec == CLIP_BPE:
    tokenizer = ClipBpeTokenizer.from_open_clip()
  else:
    tokenizer = Tokenizer.load(spec, pad="eos", clean="canonicalize" if source_kind == "hf" else "lower")
  if tokenizer.vocab_size > vocab:
    raise ConversionError(f"--tokenizer {spec}: {tokenizer.vocab_size} tokens, the model embeds only {vocab}")
  return tokenizer


def convert(source_kind: str, source: str, out: str, model_config: str | None = None,
            tokenizer: str | None = None, max_patches: int = interop.DEFAULT_MAX_PATCHES) -> str:
  """Converts `source` and writes the export directory `out`; returns its path. `max_patches`: a
  NaFlex (SigLIP 2) model's patch budget per image, recorded in the export."""
  if source_kind == "open_clip":
    mc, params = interop.from_open_clip(load_torch_state_dict(source), open_clip_model_config(model_config))
  elif source_kind == "hf":
    state_dict, hf_config = _hf_checkpoint(source)
    mc, params = interop.from_hf(state_dict, hf_config, max_patches)
  elif source_kind == "big_vision":
    mc, params = interop.from_big_vision(source, max_patches)
  else:
    raise ConversionError(f"--from {source_kind!r}; use one of {SOURCES}")
  tok = make_tokenizer(tokenizer, mc, source_kind, source if source_kind == "hf" else None)
  return bundle.write(out, mc, params, tok, {"converted_from": source_kind, "source": os.path.abspath(source)})


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m mmjax.convert_checkpoint", description=__doc__.split("\n")[0])
  parser.add_argument("--from", dest="source_kind", choices=SOURCES, required=True,
                      help="checkpoint family of --source")
  parser.add_argument("--source", required=True,
                      help="open_clip .pt/.bin/.safetensors, HF model directory, or big_vision .npz")
  parser.add_argument("--model-config", help="open_clip: model-config JSON file or model name (e.g. ViT-B-32)")
  parser.add_argument("--tokenizer", help=f"'{CLIP_BPE}' or a SentencePiece .model path (SigLIP)")
  parser.add_argument("--max-patches", type=int, default=interop.DEFAULT_MAX_PATCHES,
                      help="SigLIP 2 NaFlex models: patches per image (%(default)s, as HF's processor)")
  parser.add_argument("--out", required=True, help="export directory to create")
  cli.add_verbose_flag(parser)
  args = parser.parse_args(argv)
  with cli.user_errors(args.verbose):
    out = convert(args.source_kind, args.source, args.out, args.model_config, args.tokenizer, args.max_patches)
    print(f"exported to {out}")


if __name__ == "__main__":
  main()
