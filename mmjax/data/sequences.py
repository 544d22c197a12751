"""Token sequences for generative models: images, prompts and answers -> left-padded ids with a loss mask.

An episode is dict(image=float32 [M, S, S, 3], prompts=[M str], answers=[M str]): M images,
each followed by its prompt and answer. Each image becomes `tokens_per_image` copies of the
image token (one `<image>` for Flamingo, a run the model overwrites with visual features for
LLaVA and BLIP-2), and each answer ends with `terminator`:

  [<image> x k] prompt_1 answer_1 <term> [<image> x k] prompt_2 answer_2 <term> ...

Sequences are left-padded to `max_len`, the layout the decoder's cache and `generate` use.
`targets[i]` is `tokens[i + 1]`; `weights[i]` is 1 where that target is an answer token or a
terminator (or every real token, for language-model pretraining with `loss_on="all"`).
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np

from mmjax.data.tokenizer import Tokenizer
from mmjax.errors import ConfigError, DataError

LOSS_ON = ("answer", "all")


@dataclasses.dataclass
class BuildSequence(grain.transforms.Map):
  """Episode -> dict(image, tokens, mask, targets, weights); see the module docstring."""
  tokenizer: Tokenizer
  max_len: int
  image_token_id: int | None  # None: text only (no images in the sequence).
  tokens_per_image: int
  terminator: int
  loss_on: str = "answer"

  def __post_init__(self):
    if self.loss_on not in LOSS_ON:
      raise ConfigError(f"data.loss_on={self.loss_on!r}; expected one of {LOSS_ON}")

  def ids(self, prompts, answers) -> tuple[list[int], list[int]]:
    """Token ids and per-token answer flags; `answers` may be one shorter than `prompts` (a
    generation prompt ends with the last prompt)."""
    ids, is_answer = [], []
    for j, prompt in enumerate(prompts):
      head = ([self.image_token_id] * self.tokens_per_image if self.image_token_id is not None else [])
      head += self.tokenizer.ids(prompt)
      ids += head
      is_answer += [False] * len(head)
      if j < len(answers):
        tail = self.tokenizer.ids(answers[j]) + [self.terminator]
        ids += tail
        is_answer += [True] * len(tail)
    return ids, is_answer

  def pad(self, ids: list[int], what: str) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded int32 [max_len] ids and their bool mask; DataError when they do not fit."""
    if len(ids) > self.max_len:
      raise DataError(f"{what} needs {len(ids)} tokens; data.max_len={self.max_len} is too short "
                      "(image tokens cannot be cut)")
    tokens = np.full(self.max_len, self.tokenizer.pad_id, np.int32)
    mask = np.zeros(self.max_len, bool)
    if ids:
      tokens[-len(ids):], mask[-len(ids):] = ids, True
    return tokens, mask

  def map(self, episode: dict) -> dict:
    ids, is_answer = self.ids(episode["prompts"], episode["answers"])
    tokens, mask = self.pad(ids, f"episode {episode['prompts']!r}")
    flags = np.zeros(self.max_len, bool)
    flags[self.max_len - len(ids):] = is_answer
    targets = np.append(tokens[1:], self.tokenizer.pad_id).astype(np.int32)
    # Position i predicts token i + 1; only real tokens predict (a pad never does).
    predicted = np.append((flags[1:] if self.loss_on == "answer" else mask[1:]) & mask[:-1], False)
    out = dict(tokens=tokens, mask=mask, targets=targets, weights=predicted.astype(np.float32))
    if self.image_token_id is not None:
      out["image"] = np.asarray(episode["image"], np.float32)
    return out

  def prompt(self, episode: dict) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) of a generation prompt: every answer but the last one."""
    ids, _ = self.ids(episode["prompts"], episode["answers"][:len(episode["prompts"]) - 1])
    return self.pad(ids, f"prompt {episode['prompts']!r}")
