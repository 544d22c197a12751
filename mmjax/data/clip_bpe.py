"""CLIP's byte-level BPE tokenizer (OpenAI CLIP, open_clip), for converted CLIP weights.

Encodes exactly as `open_clip.tokenize` with its default clean="lower": `[sot] + tokens + [eot]`, cut so that
the last kept token is eot, zero-padded. The merges file ships inside the open_clip package; nothing is
downloaded.
"""
import functools
import gzip
import html
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from mmjax.data.tokenizer_base import encode_rows, write_spec
from mmjax.errors import ConfigError, DataError

try:
  import ftfy
except ImportError:  # Optional, as in open_clip's own installs: without it mojibake is left as is.
  ftfy = None
try:
  import regex
except ImportError:  # The stdlib `re` has no \p{L}; checked when a tokenizer is built.
  regex = None

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges of the file (after its header line).
SOT, EOT = "<start_of_text>", "<end_of_text>"
# Special tokens, then contractions, letter runs, single digits, other non-space runs.
WORD_PATTERN = rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|\p{{L}}+|\p{{N}}|[^\s\p{{L}}\p{{N}}]+"
WORD_CACHE_SIZE = 1 << 16


def _byte_symbols() -> dict[int, str]:
  """Byte -> one printable character, in vocabulary order: bytes that print as themselves first.

  The others (controls, space, 0x7f-0xa0, 0xad) are shifted past 255, so every symbol is printable.
  """
  direct = [*range(0x21, 0x7f), *range(0xa1, 0xad), *range(0xae, 0x100)]
  shifted = [b for b in range(256) if b not in direct]
  return {b: chr(b) for b in direct} | {b: chr(256 + i) for i, b in enumerate(shifted)}


class ClipBpeTokenizer:
  """CLIP's BPE over UTF-8 bytes: vocab 49408, pad 0, `<start_of_text>` 49406, `<end_of_text>` 49407.

  Text is cleaned as open_clip's default does: `ftfy.fix_text` (when ftfy is installed), HTML entities
  unescaped twice, whitespace runs collapsed to one space, stripped, lower-cased (full Unicode).
  Note id 0 (the pad) is also the token "!", so rows are read up to their end-of-text token.
  """

  def __init__(self, vocab_path: str | os.PathLike):
    if regex is None:
      raise ConfigError("ClipBpeTokenizer: needs the `regex` package for CLIP's \\p{L} word split "
                        "(pip install regex; open_clip_torch installs it)")
    self.vocab_path = Path(vocab_path)
    try:
      lines = gzip.decompress(self.vocab_path.read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
      raise DataError(f"{vocab_path}: cannot read CLIP BPE merges ({e})") from e
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
      raise DataError(f"{vocab_path}: expected a header line and at least {NUM_MERGES} merges "
                      f"'a b', as in open_clip's {VOCAB_FILE}")
    self._byte_symbols = _byte_symbols()
    self._symbol_bytes = {s: b for b, s in self._byte_symbols.items()}
    symbols = list(self._byte_symbols.values())
    self._tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    self._ids = {t: i for i, t in enumerate(self._tokens)}
    self._ranks = {m: i for i, m in enumerate(merges)}
    self._pattern = regex.compile(WORD_PATTERN, regex.IGNORECASE)
    self._word_ids = functools.lru_cache(WORD_CACHE_SIZE)(self._encode_word)

  @classmethod
  def from_open_clip(cls) -> "ClipBpeTokenizer":
    """The merges file inside the installed open_clip package, found without importing it (torch)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec and spec.submodule_search_locations) or ():
      if (path := Path(folder) / VOCAB_FILE).exists():
        return cls(path)
    raise DataError(f"{VOCAB_FILE}: not found in an installed open_clip package; `pip install "
                    "open_clip_torch` or pass the file's path to ClipBpeTokenizer(vocab_path)")

  @property
  def vocab_size(self) -> int:
    return len(self._tokens)

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def sot_id(self) -> int:
    return self._ids[SOT]

  @property
  def eos_id(self) -> int:
    return self._ids[EOT]

  def _clean(self, text: str) -> str:
    if ftfy is not None:
      text = ftfy.fix_text(text)
    return " ".join(html.unescape(html.unescape(text)).split()).lower()

  def _merge(self, word: str) -> list[str]:
    """Applies the merges to one word's symbols, lowest rank first, each pair left to right."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
      rank, pair = min((self._ranks.get(p, NUM_MERGES), p) for p in zip(parts, parts[1:]))
      if rank == NUM_MERGES:
        break
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
          merged.append(pair[0] + pair[1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    return parts

  def _encode_word(self, word: str) -> tuple[int, ...]:
    if word in (SOT, EOT):  # The word split keeps them whole, as open_clip does.
      return (self._ids[word],)
    return tuple(self._ids[p] for p in self._merge("".join(self._byte_symbols[b] for b in word.encode())))

  def encode(self, texts: str | Sequence[str], max_len: int) -> np.ndarray:
    """int32 [N, max_len] for a list, [max_len] for one string, as `open_clip.tokenize(texts, max_len)`."""
    return encode_rows(texts, max_len, self._ids_of, self.eos_id, self.pad_id)

  def _ids_of(self, text: str) -> list[int]:
    ids = [self.sot_id]
    for word in self._pattern.findall(self._clean(text)):
      ids.extend(self._word_ids(word))
    return ids

  def decode(self, ids: np.ndarray | Sequence) -> str | list[str]:
    """Text of each row between `<start_of_text>` and the first `<end_of_text>`, words space-separated."""
    ids = np.asarray(ids)
    rows = []
    for row in np.atleast_2d(ids).tolist():
      row = row[1:] if row[:1] == [self.sot_id] else row
      row = row[:row.index(self.eos_id)] if self.eos_id in row else row
      data = bytes(self._symbol_bytes[c] for c in "".join(self._tokens[i] for i in row))
      rows.append(data.decode("utf-8", errors="replace").replace("</w>", " ").strip())
    return rows[0] if ids.ndim == 1 else rows

  def save(self, directory: str | os.PathLike) -> None:
    """Copies the merges file into `directory` and writes its `tokenizer.json`."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(self.vocab_path, Path(directory) / VOCAB_FILE)
    write_spec(directory, {"kind": "clip_bpe", "file": VOCAB_FILE})

  def __getstate__(self) -> dict:  # Picklable for grain worker processes.
    return dict(vocab_path=self.vocab_path)

  def __setstate__(self, state: dict) -> None:
    self.__init__(**state)
