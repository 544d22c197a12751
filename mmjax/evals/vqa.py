"""VQA metrics: VQAv2 answer normalisation, exact match, VQAv2 soft accuracy, a majority baseline, per-type scores."""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Hashable, Sequence

from mmjax.errors import ConfigError, DataError

_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty".split())}
_ARTICLES = {"a", "an", "the"}
# Keys are contractions with the apostrophe already removed; "its" and "well" are left alone (they are also words).
_CONTRACTIONS = {
    "aint": "is not", "arent": "are not", "cant": "cannot", "couldnt": "could not", "didnt": "did not",
    "doesnt": "does not", "dont": "do not", "hadnt": "had not", "hasnt": "has not", "havent": "have not",
    "hes": "he is", "im": "i am", "isnt": "is not", "ive": "i have", "shes": "she is", "shouldnt": "should not",
    "thats": "that is", "theres": "there is", "theyre": "they are", "wasnt": "was not", "werent": "were not",
    "whats": "what is", "wont": "will not", "wouldnt": "would not", "youre": "you are",
}
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_APOSTROPHES = re.compile(r"['\u2019`]")
_PUNCT = re.compile(r"\.(?!\d)|[^\w\s.]|_")  # A period survives only before a digit, as in "2.5" or ".5".

References = Sequence["str | Sequence[str]"]


def normalize_answer(s: str) -> str:
  """VQAv2-style normalisation: "The Two Dogs!" -> "2 dogs", "Isn't it?" -> "is not it", "1,000" -> "1000".

  Lowercase; commas between digits and apostrophes are deleted; a period is kept only before a digit (so "2.5" stays);
  all other punctuation becomes a space; then, word by word, number words zero..twenty become digits, the articles
  a/an/the are dropped and apostrophe-less contractions ("dont", left by "don't") are expanded; spaces collapse.
  """
  s = _PUNCT.sub(" ", _APOSTROPHES.sub("", _DIGIT_COMMA.sub("", s.lower())))
  words = []
  for word in s.split():
    if word in _ARTICLES:
      continue
    words.append(_NUMBERS.get(word) or _CONTRACTIONS.get(word, word))
  return " ".join(words)


def _as_list(refs: str | Sequence[str]) -> list[str]:
  return [refs] if isinstance(refs, str) else list(refs)


def _check(predictions: Sequence[str], references: Sequence, metric: str, name: str = "references") -> None:
  if isinstance(predictions, str):
    raise ConfigError(f"{metric}: predictions is one string; pass a list with one answer per question")
  if len(predictions) != len(references):
    raise ConfigError(f"{metric}: {len(predictions)} predictions but {len(references)} {name}")
  if not predictions:
    raise DataError(f"{metric}: no predictions to score")


def exact_match(predictions: Sequence[str], references: References) -> float:
  """Fraction of predictions whose normalised form equals that of the reference, or of any one in a list of them."""
  _check(predictions, references, "exact_match")
  hits = 0
  for pred, refs in zip(predictions, references):
    hits += normalize_answer(pred) in {normalize_answer(r) for r in _as_list(refs)}
  return hits / len(predictions)


def vqa_accuracy(predictions: Sequence[str], references_lists: Sequence[Sequence[str]]) -> float:
  """The official VQAv2 soft accuracy, averaged over questions.

  For a question with N human answers (10 in VQAv2), of which m match the normalised prediction, the score averages
  min(1, matches among the other N - 1 humans / 3) over the N ways of leaving one human out:
    acc = [(N - m) * min(1, m / 3) + m * min(1, (m - 1) / 3)] / N,
  which for N = 10 is 0, 0.3, 0.6, 0.9 and 1.0 for m = 0, 1, 2, 3 and >= 4.
  All answers, human ones included, go through `normalize_answer` first.
  """
  _check(predictions, references_lists, "vqa_accuracy", "references_lists")
  total = 0.0
  for i, (pred, answers) in enumerate(zip(predictions, references_lists)):
    answers = _as_list(answers)
    if len(answers) < 2:
      raise DataError(f"vqa_accuracy: references_lists[{i}] has {len(answers)} answers; the leave-one-out average "
                      "needs at least 2 (use exact_match for single-answer data)")
    pred = normalize_answer(pred)
    hits = [normalize_answer(a) == pred for a in answers]
    m = sum(hits)
    total += sum(min(1.0, (m - left_out) / 3) for left_out in hits) / len(answers)  # Leave each human out in turn.
  return total / len(predictions)


def majority_baseline(train_answers: Sequence[str | Sequence[str]], eval_references: References) -> tuple[str, float]:
  """The most frequent normalised training answer and its `exact_match` accuracy on `eval_references`.

  A training item may be one answer or a question's list of human answers; a list counts once, as its own most
  frequent normalised answer (VQAv2's `multiple_choice_answer`). Ties go to the alphabetically first answer.
  """
  counts = Counter()
  for item in train_answers:
    if isinstance(item, str):
      counts[normalize_answer(item)] += 1
    elif item:
      counts[_most_common(Counter(normalize_answer(a) for a in item))] += 1
  if not counts:
    raise DataError("majority_baseline: train_answers is empty")
  answer = _most_common(counts)
  return answer, exact_match([answer] * len(eval_references), eval_references)


def _most_common(counts: Counter) -> str:
  top = max(counts.values())
  return min(a for a, c in counts.items() if c == top)


def per_type(predictions: Sequence[str], references: References, question_types: Sequence[Hashable],
             metric: Callable[[Sequence[str], References], float] = exact_match) -> dict[Hashable, float]:
  """`metric` (`exact_match`, or `vqa_accuracy` for lists of human answers) over each question type's questions."""
  _check(predictions, references, "per_type")
  if len(question_types) != len(predictions):
    raise ConfigError(f"per_type: {len(predictions)} predictions but {len(question_types)} question_types")
  groups: dict[Hashable, list[int]] = {}
  for i, qtype in enumerate(question_types):
    groups.setdefault(qtype, []).append(i)
  return {qtype: metric([predictions[i] for i in rows], [references[i] for i in rows])
          for qtype, rows in groups.items()}
