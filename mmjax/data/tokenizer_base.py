"""What every tokenizer kind (`tokenizer.Tokenizer`, `clip_bpe.ClipBpeTokenizer`) shares: the layout
of an encoded row and the spec file that `save` writes beside the tokenizer's own file(s)."""
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from mmjax.errors import ConfigError, DataError

SPEC_FILE = "tokenizer.json"  # What `save` writes next to the tokenizer's own file(s).


def encode_rows(texts: str | Sequence[str], max_len: int, ids_of, eos_id: int, pad_id: int) -> np.ndarray:
  """int32 [N, max_len] for a list, [max_len] for one string: each row is `ids_of(text)` cut to
  max_len - 1 ids, then EOS, then `pad_id`. Every tokenizer kind encodes through this; a text that
  is not a string of valid Unicode raises DataError (`check_text`)."""
  if max_len < 1:
    raise ConfigError(f"max_len={max_len}: expected at least 1 (room for EOS)")
  single = isinstance(texts, str)
  texts = [texts] if single else texts
  out = np.full((len(texts), max_len), pad_id, np.int32)
  for row, text in zip(out, texts):
    ids = list(ids_of(check_text(text, "text")))[:max_len - 1] + [eos_id]
    row[:len(ids)] = ids
  return out[0] if single else out


def check_text(text, where: str) -> str:
  """`text`, or DataError naming `where` and the text: it is not a str, or holds a lone surrogate
  (which a JSON caption's "\\ud800" escape makes), which no tokenizer can encode."""
  if not isinstance(text, str):
    raise DataError(f"{where} {text!r:.80}: expected a string, got {type(text).__name__}")
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise DataError(f"{where} {text!r:.80}: not valid Unicode ({e.reason}: {text[e.start]!r} at "
                    f"character {e.start})") from e
  return text


def write_spec(directory: str | os.PathLike, spec: dict) -> None:
  """Writes `tokenizer.json`: the tokenizer's kind, its file relative to `directory`, its options."""
  (Path(directory) / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
