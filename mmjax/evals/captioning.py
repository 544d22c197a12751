"""Caption metrics: corpus BLEU and CIDEr-D, defined as in pycocoevalcap but computed here without its Java tokenizer.

Both metrics take one candidate caption per image and a list of reference captions per image, and tokenize every
caption with `tokenize` (lowercase, punctuation removed, whitespace split). pycocoevalcap first runs the Stanford PTB
tokenizer, which also lowercases and drops punctuation but splits clitics ("dog's" -> "dog 's"), so scores can differ
slightly from the official ones on captions with apostrophes or hyphens; on plain lowercase words they agree.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import numpy as np

from mmjax.errors import ConfigError, DataError

_APOSTROPHES = re.compile(r"['\u2019`]")
_PUNCT = re.compile(r"[^\w\s]|_")


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
  cands, refs = _prepare(candidates, references_lists, "bleu")
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
  if min(matched) == 0:
    return 0.0
  log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / max_n
  brevity = 0.0 if cand_len >= ref_len else 1.0 - ref_len / cand_len
  return math.exp(brevity + log_precision)


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
  cands, refs = _prepare(candidates, references_lists, "cider")
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
  score = float(scores.mean())
  return (score, scores) if per_image else score
