"""Caption metrics: corpus BLEU, ROUGE-L and CIDEr-D, defined as in pycocoevalcap but computed here without its Java
tokenizer, and METEOR through pycocoevalcap where it can run (`caption_metrics`).

Every metric takes one candidate caption per image and a list of reference captions per image, and tokenizes every
caption with `tokenize` (lowercase, punctuation removed, whitespace split). pycocoevalcap first runs the Stanford PTB
tokenizer, which also lowercases and drops punctuation but splits clitics ("dog's" -> "dog 's"), so scores can differ
slightly from the official ones on captions with apostrophes or hyphens; on plain lowercase words they agree.
"""
from __future__ import annotations

import importlib.util
import math
import re
import shutil
from collections import Counter
from typing import Sequence

import numpy as np

from mmjax.errors import ConfigError, DataError

_APOSTROPHES = re.compile(r"['\u2019`]")
_PUNCT = re.compile(r"[^\w\s]|_")
_ROUGE_BETA = 1.2  # pycocoevalcap's value, "based on discussion with Hovey".


def tokenize(text: str) -> list[str]:
  """Lowercase, drop apostrophes ("dog's" -> "dogs"), turn other punctuation into spaces, split on whitespace."""
  return _PUNCT.sub(" ", _APOSTROPHES.sub("", text.lower())).split()


def _ngrams(tokens: Sequence[str], max_n: int) -> Counter:
  """Counts of every 1..max_n-gram of `tokens`, keyed by tuple (the tuple's length is the order)."""
  return Counter(tuple(tokens[i:i + k]) for k in range(1, max_n + 1) for i in range(len(tokens) - k + 1))


def _prepare(candidates: Sequence[str], references_lists: Sequence[Sequence[str] | str],
             metric: str) -> tuple[list[list[str]], list[list[list[str]]]]:
  """Tokenized candidates and reference lists, checked to pair up; a bare reference string is a list of one."""
  if isinstance(candidates, str):
    raise ConfigError(f"{metric}: candidates is one string; pass a list with one caption per image")
  if len(candidates) != len(references_lists):
    raise ConfigError(f"{metric}: {len(candidates)} candidates but {len(references_lists)} reference lists")
  if not candidates:
    raise DataError(f"{metric}: no candidates to score")
  cands, refs = [], []
  for i, (cand, rs) in enumerate(zip(candidates, references_lists)):
    rs = [rs] if isinstance(rs, str) else list(rs)
    if not rs:
      raise DataError(f"{metric}: references_lists[{i}] is empty; every image needs at least one reference")
    cands.append(tokenize(cand))
    refs.append([tokenize(r) for r in rs])
  return cands, refs


def bleu(candidates: Sequence[str], references_lists: Sequence[Sequence[str] | str], max_n: int = 4) -> float:
  """Corpus BLEU-`max_n` (Papineni et al. 2002), as pycocoevalcap's Bleu computes it.

  p_k = sum over images of clipped k-gram matches / sum over images of candidate k-grams, where a candidate k-gram's
  count is clipped to its largest count in any one reference of that image. With c the total candidate length and r
  the sum over images of the reference length closest to the candidate's (ties go to the shorter reference, as in
  pycocoevalcap's `option='closest'`), BLEU = BP * exp(mean_k log p_k) with BP = 1 if c >= r else exp(1 - r / c).
  No smoothing: if any order k has no match (or no candidate k-grams) the score is exactly 0. pycocoevalcap instead
  adds 1e-15 / 1e-9 to the counts there, which gives a tiny positive number rather than 0.
  """
  if max_n < 1:
    raise ConfigError(f"bleu: max_n={max_n} must be at least 1")
  return _bleu(*_prepare(candidates, references_lists, "bleu"), max_n)[-1]


def _bleu(cands: list[list[str]], refs: list[list[list[str]]], max_n: int) -> list[float]:
  """BLEU-1 .. BLEU-`max_n` of tokenized captions, as `bleu` defines them."""
  matched, total = [0] * max_n, [0] * max_n
  cand_len = ref_len = 0
  for cand, rs in zip(cands, refs):
    max_ref = Counter()
    for r in rs:
      max_ref |= _ngrams(r, max_n)  # Counter union keeps the larger count of each n-gram.
    for gram, count in _ngrams(cand, max_n).items():
      matched[len(gram) - 1] += min(count, max_ref[gram])
    for k in range(max_n):
      total[k] += max(0, len(cand) - k)
    cand_len += len(cand)
    ref_len += min((abs(len(r) - len(cand)), len(r)) for r in rs)[1]
  brevity = 1.0 - ref_len / cand_len if 0 < cand_len < ref_len else 0.0  # cand_len = 0 leaves nothing matched.
  scores, log_precision = [], 0.0
  for k in range(max_n):
    if matched[k] == 0:  # No smoothing: this order and the higher ones score 0.
      return scores + [0.0] * (max_n - k)
    log_precision += math.log(matched[k] / total[k])
    scores.append(math.exp(brevity + log_precision / (k + 1)))
  return scores


def cider(candidates: Sequence[str], references_lists: Sequence[Sequence[str] | str], n: int = 4, sigma: float = 6.0,
          per_image: bool = False) -> float | tuple[float, np.ndarray]:
  """Corpus CIDEr-D (Vedantam et al. 2015) as pycocoevalcap's Cider computes it; with `per_image`, also each image's.

  Over the N images of the evaluated corpus, df(g) counts the images whose reference set contains n-gram g. A caption
  becomes, for each order k = 1..n, a vector of raw counts times idf: v(g) = tf(g) * (log N - log max(1, df(g))), so
  an n-gram unseen in the references gets the largest idf, log N, and one in every image's references gets 0. For a
  candidate c and reference r, sim_k = sum_g min(v_c(g), v_r(g)) * v_r(g) / (|v_c| |v_r|) over the candidate's
  k-grams (the min clips repeated candidate n-grams), taken as 0 when either norm is 0 (e.g. a caption shorter than k),
  times the length penalty exp(-(len_c - len_r)^2 / (2 sigma^2)) in words. An image's score is 10 * the mean of sim_k
  over k = 1..n and over its references; the corpus score is the mean over images. pycocoevalcap measures lengths in
  bigrams, i.e. max(len - 1, 0), which gives the same score whenever n >= 2 (the differences agree unless a caption
  is empty, and then its vectors are zero); for n = 1 it counts no bigrams and so applies no penalty, unlike here.
  """
  if n < 1:
    raise ConfigError(f"cider: n={n} must be at least 1")
  if not sigma > 0:
    raise ConfigError(f"cider: sigma={sigma} must be positive")
  scores = _cider(*_prepare(candidates, references_lists, "cider"), n, sigma)
  score = float(scores.mean())
  return (score, scores) if per_image else score


def _cider(cands: list[list[str]], refs: list[list[list[str]]], n: int, sigma: float) -> np.ndarray:
  """Each image's CIDEr-D of tokenized captions, as `cider` defines it."""
  cand_grams = [_ngrams(c, n) for c in cands]
  ref_grams = [[_ngrams(r, n) for r in rs] for rs in refs]
  df = Counter(g for rs in ref_grams for g in set().union(*rs))
  log_images = math.log(len(cands))

  def vectors(counts: Counter) -> tuple[list[dict], list[float]]:
    vec = [{} for _ in range(n)]
    for gram, count in counts.items():
      vec[len(gram) - 1][gram] = count * (log_images - math.log(max(1.0, df[gram])))
    return vec, [math.sqrt(sum(w * w for w in v.values())) for v in vec]

  scores = np.zeros(len(cands))
  for i, (cand, rs) in enumerate(zip(cands, refs)):
    vec_c, norm_c = vectors(cand_grams[i])
    total = 0.0
    for r, r_grams in zip(rs, ref_grams[i]):
      vec_r, norm_r = vectors(r_grams)
      penalty = math.exp(-(len(cand) - len(r)) ** 2 / (2 * sigma ** 2))
      for k in range(n):
        if norm_c[k] > 0 and norm_r[k] > 0:
          dot = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_c[k].items())
          total += penalty * dot / (norm_c[k] * norm_r[k])
    scores[i] = 10.0 * total / (n * len(rs))
  return scores


def rouge_l(candidates: Sequence[str], references_lists: Sequence[Sequence[str] | str]) -> float:
  """ROUGE-L (Lin 2004) as pycocoevalcap's Rouge computes it: the mean over images of an LCS-based F-measure.

  For an image, with lcs(c, r) the length in words of the longest common subsequence of candidate c and reference r,
  P = max over references of lcs / len(c) and R = max over references of lcs / len(r) (each maximum taken on its
  own, possibly at different references); the image scores (1 + b^2) P R / (R + b^2 P) with b = 1.2, or 0 if P or
  R is 0. An empty candidate scores 0 (pycocoevalcap would count an empty string as one empty word).
  """
  return float(_rouge_l(*_prepare(candidates, references_lists, "rouge_l")).mean())


def _rouge_l(cands: list[list[str]], refs: list[list[list[str]]]) -> np.ndarray:
  """Each image's ROUGE-L of tokenized captions, as `rouge_l` defines it."""
  beta2 = _ROUGE_BETA ** 2
  scores = np.zeros(len(cands))
  for i, (cand, rs) in enumerate(zip(cands, refs)):
    lcs = [_lcs_length(cand, r) for r in rs]
    precision = max(lcs) / len(cand) if cand else 0.0
    recall = max((m / len(r) for m, r in zip(lcs, rs) if r), default=0.0)
    if precision > 0 and recall > 0:
      scores[i] = (1 + beta2) * precision * recall / (recall + beta2 * precision)
  return scores


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest common subsequence of two token lists (dynamic programming, one row at a time)."""
  row = [0] * (len(b) + 1)
  for x in a:
    diag = 0  # The previous row's entry at j - 1.
    for j, y in enumerate(b, 1):
      up = row[j]
      row[j] = diag + 1 if x == y else max(up, row[j - 1])
      diag = up
  return row[-1]


def meteor_available() -> bool:
  """Whether `caption_metrics` reports METEOR: pycocoevalcap is installed and `java` is on PATH."""
  return importlib.util.find_spec("pycocoevalcap") is not None and shutil.which("java") is not None


def caption_metrics(candidates: Sequence[str], references_lists: Sequence[Sequence[str] | str],
                    meteor: bool = True) -> dict[str, float]:
  """The COCO caption metrics: {"bleu1", .., "bleu4", "rouge_l", "cider"} and, if it can run, "meteor".

  BLEU-1..4, ROUGE-L and CIDEr-D are this module's `bleu`, `rouge_l` and `cider`. METEOR (Banerjee and Lavie 2005)
  is not reimplemented: it is pycocoevalcap's Meteor, which runs the METEOR 1.5 jar through `java` (starting a JVM
  takes seconds), on the same `tokenize`d captions. The key is present only when `meteor` is true and
  `meteor_available()`; otherwise it is left out rather than reported as 0.
  """
  cands, refs = _prepare(candidates, references_lists, "caption_metrics")
  results = {f"bleu{k}": score for k, score in enumerate(_bleu(cands, refs, 4), 1)}
  results["rouge_l"] = float(_rouge_l(cands, refs).mean())
  results["cider"] = float(_cider(cands, refs, n=4, sigma=6.0).mean())
  if meteor and meteor_available():
    from pycocoevalcap.meteor.meteor import Meteor  # Optional: the `dev` extra installs it.
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(c)] for i, c in enumerate(cands)}
    results["meteor"] = float(Meteor().compute_score(gts, res)[0])
  return results
