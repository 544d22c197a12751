"""VQA metrics: VQAv2 answer normalisation, exact match, VQAv2 soft accuracy, a majority baseline, per-type scores."""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Hashable, Sequence

from mmjax.errors import ConfigError, DataError

# The definitions of the official VQA evaluation (vqaEval.py of the GT-Vision-Lab VQA API), re-expressed.
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # The apostrophe and the period are not among them.
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=" is a typo for a lookbehind and checks nothing, so any
# period not followed by a digit goes ("3." -> "3", ".5" stays). It passes re.UNICODE (= 32) where `sub` takes its
# count, so at most the first 32 such periods are removed, here too.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = 32
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}


def _contractions() -> dict[str, str]:
  """Word -> contraction, as the official table maps them after lowercasing.

  The official keys are each contraction with exactly one of its apostrophes left out: "dont" -> "don't",
  "couldnt've" and "couldn'tve" -> "couldn't've" (but not "couldntve"), "twas" -> "'twas". Forms that are also words
  ("its", "well", "were", "hell", "shed", "wed", "id") are not in it. Its keys "Im", "Ive", "Id've" and "I'dve" are
  capitalised and so never match the lowercased text: "im" stays "im". It also maps "somebody'd" to "somebodyd".
  """
  forms = (
      "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
      "he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've "
      "needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've "
      "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
      "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've "
      "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've "
      "why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
      "you're you've").split()
  table = {form[:i] + form[i + 1:]: form for form in forms for i, c in enumerate(form) if c == "'"}
  table["somebody'd"] = "somebodyd"
  return table


_CONTRACTIONS = _contractions()

References = Sequence["str | Sequence[str]"]


def _process_punctuation(text: str) -> str:
  """The official processPunctuation, applied to predictions and (see `vqa_accuracy`) to human answers.

  Each mark of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted if it occurs next to a space somewhere in the
  text, or if the text anywhere has a comma between two digits ("1,000": then every mark is deleted); otherwise it
  becomes a space ("t-shirt" -> "t shirt"). Then periods not followed by a digit are deleted.
  """
  delete = _DIGIT_COMMA_DIGIT.search(text) is not None
  out = text
  for mark in _PUNCTUATION:
    out = out.replace(mark, "" if delete or mark + " " in text or " " + mark in text else " ")
  return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def normalize_answer(s: str) -> str:
  """The official VQA normalisation of an answer: "Two dogs." -> "2 dogs", "isnt it" -> "isn't it", "1,000" -> "1000".

  Newlines and tabs become spaces and the ends are stripped; punctuation as in `_process_punctuation` (apostrophes are
  kept, so "man's" and "don't" stay); then the text is lowercased and split on whitespace, number words zero..ten
  (and "none") become digits, the articles a/an/the are dropped, apostrophe-less contractions get their apostrophes
  back ("dont" -> "don't"; see `_contractions`), and the words are joined with single spaces.
  """
  s = _process_punctuation(s.replace("\n", " ").replace("\t", " ").strip())
  words = (_NUMBERS.get(w, w) for w in s.lower().split())
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


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
  """Fraction of predictions whose normalised form equals that of the reference, or of any one in a list of them.

  Unlike `vqa_accuracy`, both sides go through the full `normalize_answer`.
  """
  _check(predictions, references, "exact_match")
  hits = 0
  for pred, refs in zip(predictions, references):
    hits += normalize_answer(pred) in {normalize_answer(r) for r in _as_list(refs)}
  return hits / len(predictions)


def vqa_accuracy(predictions: Sequence[str], references_lists: Sequence[Sequence[str]]) -> float:
  """The official VQAv2 soft accuracy, averaged over questions; per answer type: `per_type(..., metric=vqa_accuracy)`.

  For a question with N human answers (10 in VQAv2), of which m match the prediction, the score averages
  min(1, matches among the other N - 1 humans / 3) over the N ways of leaving one human out:
    acc = [(N - m) * min(1, m / 3) + m * min(1, (m - 1) / 3)] / N,
  which for N = 10 is 0, 0.3, 0.6, 0.9 and 1.0 for m = 0, 1, 2, 3 and >= 4.

  Matching follows the official script, asymmetric as it is: the prediction goes through `normalize_answer`, the
  human answers only through its punctuation step, and only when they are not all identical; they are never
  lowercased, nor are their number words or articles changed. VQAv2's stored answers are already normalised, so on
  them this gives the official numbers. Pass raw human answers through `normalize_answer` first, or "Two" among them
  never matches any prediction. A quirk kept from the official script: ten identical human answers "t-shirt" score
  0 against the prediction "t-shirt", which becomes "t shirt".
  """
  _check(predictions, references_lists, "vqa_accuracy", "references_lists")
  total = 0.0
  for i, (pred, answers) in enumerate(zip(predictions, references_lists)):
    answers = _as_list(answers)
    if len(answers) < 2:
      raise DataError(f"vqa_accuracy: references_lists[{i}] has {len(answers)} answers; the leave-one-out average "
                      "needs at least 2 (use exact_match for single-answer data)")
    if len(set(answers)) > 1:
      answers = [_process_punctuation(a) for a in answers]
    pred = normalize_answer(pred)
    hits = [a == pred for a in answers]
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
