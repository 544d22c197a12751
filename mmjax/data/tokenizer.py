"""SentencePiece tokenizer with fixed-length, EOS-terminated, padded encoding; saved tokenizer specs.

Train the shipped shapes models (deterministic):
  python -m mmjax.data.tokenizer train --source shapes --out mmjax/assets/shapes.model
  python -m mmjax.data.tokenizer train --source shapes_vlm --out mmjax/assets/shapes_vlm.model
"""
import argparse
import io
import json
import os
import re
import string
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from mmjax import cli
from mmjax.data import shapes, shapes_vqa
from mmjax.data.clip_bpe import ClipBpeTokenizer
from mmjax.data.folder import CaptionFolderSource
from mmjax.data.tokenizer_base import SPEC_FILE, encode_rows, write_spec
from mmjax.errors import ConfigError, DataError

PAD_ID, UNK_ID, EOS_ID = 0, 1, 2
SHAPES_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes.model"
SHAPES_VOCAB_SIZE = 160
# The vision-language models' vocabulary: captions, questions and answers, plus the media markers.
SHAPES_VLM_MODEL = SHAPES_MODEL.with_name("shapes_vlm.model")
IMAGE_TOKEN, END_OF_CHUNK = "<image>", "<|endofchunk|>"
SENTENCEPIECE_FILE = "tokenizer.model"
PAD_MODES = ("zero", "eos")
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
CLEANERS = {
    "none": lambda text: text,
    "lower": lambda text: text.translate(_ASCII_LOWER),
    "canonicalize": lambda text: re.sub(r"\s+", " ", text.lower().translate(_NO_PUNCTUATION)).strip(),
}


class Tokenizer:
  """Wraps a SentencePiece model that has an EOS piece.

  pad="zero" (mmjax's own models) pads with id 0 and needs the model's pad id to be 0. pad="eos" pads with
  the EOS id, SigLIP's convention (big_vision `tokenize(max_len=64, eos="sticky", pad_value=1)` with
  c4_en/Gemma models, whose EOS is 1), and loads any model with an EOS piece. Either way a row ends in EOS,
  also when the text is cut.

  clean, applied to each text before SentencePiece:
    "none": as is.
    "lower": ASCII letters lower-cased, nothing else ("ÉCOLE" -> "École"): big_vision's `lower=True`
      (`tf.strings.lower`, ASCII by default), what SigLIP's training captions went through.
    "canonicalize": as HF `SiglipTokenizer.canonicalize_text`: `str.lower()` (all of Unicode), every ASCII
      punctuation character deleted (`string.punctuation`, "_" included), runs of (Unicode) whitespace
      collapsed to one space, stripped. HF applies it to every text; big_vision only to zero-shot prompts,
      and its version turns "_" into a space and keeps "," in class names.
  Unlike HF `SiglipTokenizer`, literal "</s>" or "<unk>" in a text are encoded as text, not as their
  special ids: big_vision calls SentencePiece directly, which never matches control pieces in text.
  """

  def __init__(self, model_proto: bytes, model_path: str | os.PathLike | None = None, pad: str = "zero",
               clean: str = "none"):
    if pad not in PAD_MODES:
      raise ConfigError(f"pad={pad!r}: expected one of {PAD_MODES}")
    if clean not in CLEANERS:
      raise ConfigError(f"clean={clean!r}: expected one of {tuple(CLEANERS)}")
    self.model_proto = model_proto  # Serialised model, for exports.
    self.model_path = model_path
    self.pad, self.clean = pad, clean
    self._clean = CLEANERS[clean]
    self._sp = spm.SentencePieceProcessor()
    name = model_path or "serialised model"
    try:
      self._sp.LoadFromSerializedProto(model_proto)
    except (RuntimeError, OSError) as e:
      raise DataError(f"{name}: not a SentencePiece model ({e})") from e
    if self._sp.eos_id() < 0 or (pad == "zero" and self._sp.pad_id() != PAD_ID):
      needs = "an EOS piece" if pad == "eos" else f"pad_id={PAD_ID} and an EOS piece (or pad='eos')"
      raise DataError(f"{name}: expected {needs}, got pad_id={self._sp.pad_id()} eos_id={self._sp.eos_id()}")

  @classmethod
  def load(cls, path: str | os.PathLike, pad: str = "zero", clean: str = "none") -> "Tokenizer":
    try:
      proto = Path(path).read_bytes()
    except OSError as e:
      raise DataError(f"{path}: cannot read tokenizer model ({e})") from e
    return cls(proto, model_path=path, pad=pad, clean=clean)

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def pad_id(self) -> int:
    return self.eos_id if self.pad == "eos" else PAD_ID

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def piece_id(self, piece: str) -> int:
    """Id of a special piece such as IMAGE_TOKEN; DataError when the model lacks it."""
    i = self._sp.PieceToId(piece)
    if i == self._sp.unk_id() and piece != self._sp.IdToPiece(i):
      raise DataError(f"{self.model_path or 'tokenizer'}: no piece {piece!r}; train it with "
                      "user-defined symbols (e.g. `--source shapes_vlm`)")
    return i

  def ids(self, text: str) -> list[int]:
    """The pieces of the cleaned text, without EOS or padding."""
    return self._sp.EncodeAsIds(self._clean(text))

  def encode(self, texts: str | Sequence[str], max_len: int) -> np.ndarray:
    """int32 [N, max_len] for a list, [max_len] for one string.

    Each row is the pieces of the cleaned text, truncated to max_len - 1, then EOS, then `pad_id`.
    """
    # One string at a time: list input goes through a thread pool costing ~100us.
    return encode_rows(texts, max_len, self.ids, self.eos_id, self.pad_id)

  def decode(self, ids: np.ndarray | Sequence) -> str | list[str]:
    """Inverse of `encode`: reads each row up to its first EOS, ignoring padding."""
    ids = np.asarray(ids)
    rows = []
    for row in np.atleast_2d(ids).tolist():
      row = row[:row.index(self.eos_id)] if self.eos_id in row else row
      rows.append(self._sp.DecodeIds([i for i in row if i != self.pad_id]))
    return rows[0] if ids.ndim == 1 else rows

  def save(self, directory: str | os.PathLike) -> None:
    """Writes the model as `tokenizer.model` into `directory`, with its `tokenizer.json`."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / SENTENCEPIECE_FILE).write_bytes(self.model_proto)
    write_spec(directory, {"kind": "sentencepiece", "file": SENTENCEPIECE_FILE, "pad": self.pad,
                           "clean": self.clean})

  def __getstate__(self) -> dict:  # Picklable for grain worker processes.
    return dict(model_proto=self.model_proto, model_path=self.model_path, pad=self.pad, clean=self.clean)

  def __setstate__(self, state: dict) -> None:
    self.__init__(**state)


def train_tokenizer(texts: Iterable[str], out_path: str | os.PathLike, vocab_size: int,
                    model_type: str = "bpe", special_pieces: Sequence[str] = (),
                    character_coverage: float = 1.0) -> Tokenizer:
  """Trains a SentencePiece model on `texts`, writes it to `out_path` and loads it.

  Single-threaded with input shuffling off, so the same texts give the same bytes. A corpus too
  small for `vocab_size` gives a smaller vocabulary (SentencePiece's soft limit), with a warning
  naming both sizes. `character_coverage` below 1 (SentencePiece suggests 0.9995 for languages
  with large alphabets) maps the rarest characters to <unk>.
  """
  if not 0 < character_coverage <= 1:
    raise ConfigError(f"character_coverage={character_coverage}: expected a value in (0, 1]")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
      model_type=model_type, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=-1, eos_id=EOS_ID,
      hard_vocab_limit=False, character_coverage=character_coverage, num_threads=1,
      shuffle_input_sentence=False, minloglevel=2, user_defined_symbols=list(special_pieces))
  Path(out_path).parent.mkdir(parents=True, exist_ok=True)
  Path(out_path).write_bytes(model.getvalue())
  tokenizer = Tokenizer.load(out_path)
  if tokenizer.vocab_size < vocab_size:
    warnings.warn(f"{out_path}: the corpus supports a vocabulary of {tokenizer.vocab_size} pieces, not the "
                  f"{vocab_size} requested; more (or more varied) text gives more", stacklevel=2)
  return tokenizer


def shapes_corpus(num_texts: int, seed: int = 0) -> list[str]:
  """Training captions over all combinations plus every zero-shot prompt."""
  source = shapes.ShapesSource(seed=seed, held_out_fraction=0.0)
  names = [shapes.class_name(c, s) for c in range(len(shapes.COLOUR_NAMES))
           for s in range(len(shapes.SHAPES))]
  prompts = [t.format(n) for t in shapes.CLASS_TEMPLATES for n in names]
  return [source[i]["caption"] for i in range(num_texts)] + prompts


def default_shapes_tokenizer() -> Tokenizer:
  """The tokenizer shipped for the shapes data (mmjax/assets/shapes.model)."""
  if not SHAPES_MODEL.exists():
    raise DataError(f"{SHAPES_MODEL}: missing; create it with "
                    "`python -m mmjax.data.tokenizer train --source shapes`")
  return Tokenizer.load(SHAPES_MODEL)


def load_tokenizer(spec: str):
  """`data.tokenizer`: "shapes" or "shapes_vlm" for the shipped shapes models, "clip_bpe" for CLIP's
  BPE (the vocabulary open_clip ships), otherwise a SentencePiece `.model` path. ("from_init", the
  tokenizer of the export a run starts from, is the task's to resolve: `tasks.contrastive`.)"""
  if spec == "shapes":
    return default_shapes_tokenizer()
  if spec == "clip_bpe":
    return ClipBpeTokenizer.from_open_clip()
  if spec == "from_init":
    raise ConfigError("data.tokenizer='from_init' needs init_from to start the whole model from an export: "
                      "init_from=(('', EXPORT),) (or ('base', EXPORT) with adapt.method)")
  return Tokenizer.load(SHAPES_VLM_MODEL if spec == "shapes_vlm" else spec)


def load_saved_tokenizer(directory: str | os.PathLike):
  """The tokenizer that `save(directory)` wrote, of whichever kind (`Tokenizer`, `ClipBpeTokenizer`)."""
  path = Path(directory) / SPEC_FILE
  try:
    spec = json.loads(path.read_text())
  except OSError as e:
    raise DataError(f"{path}: cannot read tokenizer spec ({e}); not a saved tokenizer directory") from e
  except ValueError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from e
  kinds = {"sentencepiece": (Tokenizer.load, ("pad", "clean")), "clip_bpe": (ClipBpeTokenizer, ())}
  if not isinstance(spec, dict) or not isinstance(spec.get("file"), str):
    raise DataError(f'{path}: expected {{"kind": ..., "file": ..., options}}, got {spec!r}')
  if spec.get("kind") not in kinds:
    raise DataError(f"{path}: unknown tokenizer kind {spec.get('kind')!r}; expected one of {tuple(kinds)}")
  build, option_names = kinds[spec["kind"]]
  options = {k: v for k, v in spec.items() if k not in ("kind", "file")}
  if unknown := set(options) - set(option_names):
    raise DataError(f"{path}: unknown options {sorted(unknown)} for kind {spec['kind']!r}; "
                    f"expected some of {option_names}")
  try:
    return build(Path(directory) / spec["file"], **options)
  except ConfigError as e:
    raise DataError(f"{path}: {e}") from e


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m mmjax.data.tokenizer")
  commands = parser.add_subparsers(dest="command", required=True)
  train = commands.add_parser("train", help="train a SentencePiece model")
  train.add_argument("--source", choices=("shapes", "shapes_vlm", "captions"), default="shapes")
  train.add_argument("--captions", help="JSONL/CSV caption file (for --source captions)")
  train.add_argument("--out", default=str(SHAPES_MODEL))
  train.add_argument("--vocab_size", type=int, default=SHAPES_VOCAB_SIZE)
  train.add_argument("--num_texts", type=int, default=20_000,
                     help="captions drawn from the shapes source")
  train.add_argument("--character_coverage", type=float, default=1.0,
                     help="fraction of characters the vocabulary covers (0.9995 for large alphabets)")
  cli.add_verbose_flag(train)
  args = parser.parse_args(argv)
  with cli.user_errors(args.verbose):
    _train(parser, args)


def _train(parser, args) -> None:
  special = ()
  if args.source == "shapes":
    texts = shapes_corpus(args.num_texts)
  elif args.source == "shapes_vlm":
    texts, special = shapes_corpus(args.num_texts) + shapes_vqa.corpus(args.num_texts), (IMAGE_TOKEN, END_OF_CHUNK)
  elif args.captions:
    texts = CaptionFolderSource(args.captions).captions
  else:
    parser.error("--source captions needs --captions PATH")
  tokenizer = train_tokenizer(texts, args.out, args.vocab_size, special_pieces=special,
                              character_coverage=args.character_coverage)
  print(f"wrote {args.out}: vocab_size={tokenizer.vocab_size} (requested {args.vocab_size}) from {len(texts)} texts")


if __name__ == "__main__":
  main()
