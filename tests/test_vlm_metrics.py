"""Caption (BLEU, ROUGE-L, CIDEr-D, METEOR) and VQA metrics against examples worked by hand, with the arithmetic
spelled out inline, and against pycocoevalcap and the official VQA evaluation's rules."""
import itertools
import math

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from mmjax.errors import ConfigError, DataError
from mmjax.evals import captioning, vqa


# --- Tokenisation and BLEU ---------------------------------------------------------------------------------------


def test_tokenize_lowercases_and_drops_punctuation():
  assert captioning.tokenize("A man's hat, red-and-white.") == ["a", "mans", "hat", "red", "and", "white"]
  assert captioning.bleu(["A cat, sitting."], [["a cat sitting"]], max_n=3) == 1.0


def test_bleu_corpus_counts_and_brevity_penalty_by_hand():
  candidates = ["a cat sat on the mat", "there is a dog"]
  references = [["the cat sat on the mat", "a cat is on a mat"],
                ["there is a big dog here", "a dog is sitting in the garden"]]
  # Image 0, candidate length 6, reference lengths 6 and 6 -> closest 6. Clipped matches / candidate n-grams:
  #   1-grams: a cat sat on the mat, each found (a: 2 in ref 2, the: 2 in ref 1)                    -> 6 / 6
  #   2-grams: "a cat" (ref 2), "cat sat" "sat on" "on the" "the mat" (ref 1)                        -> 5 / 5
  #   3-grams: "a cat sat" no; "cat sat on", "sat on the", "on the mat" yes                          -> 3 / 4
  #   4-grams: "a cat sat on" no; "cat sat on the", "sat on the mat" yes                             -> 2 / 3
  # Image 1, candidate length 4, reference lengths 6 and 7 -> closest 6.
  #   1-grams: there is a dog                                                                       -> 4 / 4
  #   2-grams: "there is", "is a" (ref 1), "a dog" (ref 2)                                           -> 3 / 3
  #   3-grams: "there is a" yes (ref 1), "is a dog" no                                               -> 1 / 2
  #   4-grams: "there is a dog" no                                                                   -> 0 / 1
  # Corpus: p1 = 10/10, p2 = 8/8, p3 = 4/6, p4 = 2/4; c = 6 + 4 = 10 < r = 6 + 6 = 12, so BP = exp(1 - 12/10).
  p = [10 / 10, 8 / 8, 4 / 6, 2 / 4]
  brevity = math.exp(1 - 12 / 10)
  want4 = brevity * math.exp(sum(math.log(x) for x in p) / 4)
  assert captioning.bleu(candidates, references) == pytest.approx(want4, rel=1e-12)
  assert want4 == pytest.approx(math.exp(-0.2) * (1 / 3) ** 0.25)
  want2 = brevity * math.exp((math.log(p[0]) + math.log(p[1])) / 2)  # = exp(-0.2): only the brevity penalty.
  assert captioning.bleu(candidates, references, max_n=2) == pytest.approx(want2, rel=1e-12)


def test_bleu_clips_repeated_words():
  # Papineni et al.'s example: "the" x7 is clipped to 2 (its count in reference 1); lengths 7 vs refs 6, 7 -> BP 1.
  refs = [["the cat is on the mat", "there is a cat on the mat"]]
  assert captioning.bleu(["the the the the the the the"], refs, max_n=1) == pytest.approx(2 / 7)


def test_bleu_closest_reference_length_ties_go_to_the_shorter():
  # Candidate length 4, references of length 3 and 5 are equally close: r = 3 <= c, so no penalty, p1 = 4/4 -> 1.
  assert captioning.bleu(["a b c d"], [["a b c", "a b c d e"]], max_n=1) == 1.0
  # Candidate length 2, closest reference length 5 (over 8): BP = exp(1 - 5/2), p1 = 2/2.
  assert captioning.bleu(["a b"], [["a b c d e", "a b c d e f g h"]], max_n=1) == pytest.approx(math.exp(1 - 5 / 2))


def test_bleu_perfect_match_is_one_and_no_overlap_is_zero():
  refs = [["a dog runs on the grass", "a brown dog"], ["two people ride bikes down a hill"]]
  assert captioning.bleu(["a dog runs on the grass", "two people ride bikes down a hill"], refs) == 1.0
  assert captioning.bleu(["zebras eat", "blue sky"], refs) == 0.0
  # Unigrams and bigrams match but no 4-gram does: without smoothing BLEU-4 is exactly 0, BLEU-2 is not.
  assert captioning.bleu(["a brown dog", "people ride"], refs) == 0.0
  assert captioning.bleu(["a brown dog", "people ride"], refs, max_n=2) > 0.0


def test_caption_metrics_name_the_bad_argument():
  with pytest.raises(ConfigError, match="2 candidates but 1 reference lists"):
    captioning.bleu(["a", "b"], [["a"]])
  with pytest.raises(DataError, match=r"references_lists\[1\] is empty"):
    captioning.cider(["a", "b"], [["a"], []])
  with pytest.raises(ConfigError, match="one string"):
    captioning.bleu("a cat", ["a cat"])
  with pytest.raises(ConfigError, match="max_n=0"):
    captioning.bleu(["a"], [["a"]], max_n=0)
  with pytest.raises(ConfigError, match="sigma=0"):
    captioning.cider(["a"], [["a"]], sigma=0)
  with pytest.raises(ConfigError, match="caption_metrics: 1 candidates but 2 reference lists"):
    captioning.caption_metrics(["a"], [["a"], ["b"]])


# --- CIDEr-D -------------------------------------------------------------------------------------------------------


def _penalty(len_c, len_r, sigma=6.0):
  return math.exp(-(len_c - len_r) ** 2 / (2 * sigma ** 2))


def test_cider_tfidf_arithmetic_on_a_three_image_corpus():
  candidates = ["a dog runs", "a cat", "a bird a bird"]
  references = [["a dog runs", "the dog runs fast"], ["a cat sleeps"], ["a dog and a bird"]]
  # N = 3 images. idf(g) = log N - log max(1, df(g)), df = number of images whose references contain g.
  L = math.log(3)                 # df 1 (or unseen): runs the fast cat sleeps and bird | every bigram but "a dog"
  D = math.log(3) - math.log(2)   # df 2: "dog" (images 0, 2) | "a dog" (images 0, 2)
  # df 3: "a" (all images) -> idf log 3 - log 3 = 0, so "a" weighs nothing.
  # Vectors are raw count * idf; sim = sum over candidate n-grams of min(c, r) * r / (|c| |r|), times the penalty.
  # Image 0, "a dog runs" (3 words): unigrams {a: 0, dog: D, runs: L}, bigrams {a dog: D, dog runs: L}.
  #   ref "a dog runs" is identical: sim1 = sim2 = 1, penalty 1.
  #   ref "the dog runs fast" (4 words): unigrams {the: L, dog: D, runs: L, fast: L},
  #   bigrams {the dog: L, dog runs: L, runs fast: L}; penalty exp(-1/72).
  s0_r2_1 = (D * D + L * L) / (math.sqrt(D * D + L * L) * math.sqrt(D * D + 3 * L * L)) * _penalty(3, 4)
  s0_r2_2 = (L * L) / (math.sqrt(D * D + L * L) * math.sqrt(3 * L * L)) * _penalty(3, 4)
  # Image 1, "a cat" (2 words) vs "a cat sleeps" (3): unigrams {a: 0, cat: L} . {a: 0, cat: L, sleeps: L},
  #   bigrams {a cat: L} . {a cat: L, cat sleeps: L}: both L^2 / (L * sqrt(2) L) = 1 / sqrt(2).
  s1_1 = s1_2 = 1 / math.sqrt(2) * _penalty(2, 3)
  # Image 2, "a bird a bird" (4 words) vs "a dog and a bird" (5): the candidate has bird x2 -> 2L, clipped to the
  #   reference's L: unigrams {a: 0, bird: 2L} . {a: 0, dog: D, and: L, bird: L} -> min(2L, L) * L = L^2,
  #   |c| = 2L, |r| = sqrt(D^2 + 2 L^2). Bigrams {a bird: 2L, bird a: L} . {a dog: D, dog and: L, and a: L,
  #   a bird: L} -> min(2L, L) * L = L^2, |c| = sqrt(5) L, |r| = sqrt(D^2 + 3 L^2).
  s2_1 = L * L / (2 * L * math.sqrt(D * D + 2 * L * L)) * _penalty(4, 5)
  s2_2 = L * L / (math.sqrt(5) * L * math.sqrt(D * D + 3 * L * L)) * _penalty(4, 5)
  # Image score = 10 * mean over orders k and references of sim_k.
  want1 = [10 * (1 + s0_r2_1) / 2, 10 * s1_1, 10 * s2_1]
  want2 = [10 * (1 + 1 + s0_r2_1 + s0_r2_2) / 4, 10 * (s1_1 + s1_2) / 2, 10 * (s2_1 + s2_2) / 2]
  for n, want in ((1, want1), (2, want2)):
    score, per_image = captioning.cider(candidates, references, n=n, per_image=True)
    np.testing.assert_allclose(per_image, want, rtol=1e-12)
    assert score == pytest.approx(np.mean(want), rel=1e-12)
  # Without clipping image 2's unigram term would be 2 L^2 / (...): twice as large.
  assert want1[2] == pytest.approx(10 * 0.5 / math.sqrt((D * D + 2 * L * L) / (L * L)) * _penalty(4, 5))


def test_cider_identical_caption_scores_ten_when_the_corpus_has_several_images():
  # N = 2. Candidate 0 equals its reference, so for each k its tf-idf vector equals the reference's and sim_k = 1,
  # as long as that vector is non-zero: "a" is in both images' references (idf log 2 - log 2 = 0) but every other
  # n-gram has df 1 (idf log 2 > 0). Score = 10 * (1 + 1 + 1 + 1) / 4 = 10.
  candidates = ["a brown dog runs fast", "two men ride horses"]
  references = [["a brown dog runs fast"], ["people on a beach"]]
  score, per_image = captioning.cider(candidates, references, per_image=True)
  assert per_image[0] == pytest.approx(10.0, rel=1e-12)
  assert per_image[1] == 0.0  # No n-gram in common with "people on a beach".
  assert score == pytest.approx(5.0, rel=1e-12)
  # A 2-word caption has no 3- or 4-grams, so those orders score 0: 10 * (1 + 1 + 0 + 0) / 4 = 5.
  assert captioning.cider(["red car", "blue sky"], [["red car"], ["green grass"]], per_image=True)[1][0] == (
      pytest.approx(5.0, rel=1e-12))


def test_cider_is_zero_on_a_one_image_corpus():
  # With N = 1 every reference n-gram has df 1 = N, so idf = log 1 - log 1 = 0 and every vector is zero.
  assert captioning.cider(["a dog runs"], [["a dog runs"]]) == 0.0


def test_cider_length_penalty_and_sigma():
  # Image 1 scores 0 (no common n-gram); image 0's sim_k do not depend on sigma, only its penalty
  # exp(-(3 - 5)^2 / (2 sigma^2)) does, so the corpus scores for two sigmas differ by the ratio of penalties.
  cands, refs = ["a dog runs", "green grass"], [["a dog runs very fast"], ["sky"]]
  ratio = captioning.cider(cands, refs, sigma=2.0) / captioning.cider(cands, refs, sigma=6.0)
  assert ratio == pytest.approx(_penalty(3, 5, 2.0) / _penalty(3, 5, 6.0), rel=1e-12)


# --- ROUGE-L, and every metric against pycocoevalcap ----------------------------------------------------------------


def test_rouge_l_takes_precision_and_recall_maxima_separately():
  # Candidate "a dog runs on grass" (5 words).
  #   ref "a dog runs fast on the green grass" (8): LCS "a dog runs on grass" = 5 -> P 5/5, R 5/8.
  #   ref "dog on grass" (3): LCS "dog on grass" = 3 -> P 3/5, R 3/3.
  # P = max(1, 3/5) = 1 (first reference), R = max(5/8, 1) = 1 (second): F = (1 + 1.44) * 1 * 1 / (1 + 1.44) = 1.
  refs = [["a dog runs fast on the green grass", "dog on grass"]]
  assert captioning.rouge_l(["a dog runs on grass"], refs) == pytest.approx(1.0, rel=1e-12)
  # With only the first reference: P = 1, R = 5/8, F = 2.44 * 5/8 / (5/8 + 1.44).
  assert captioning.rouge_l(["a dog runs on grass"], [refs[0][:1]]) == pytest.approx(
      2.44 * 0.625 / (0.625 + 1.44), rel=1e-12)
  # LCS is a subsequence, not a substring: "cat the mat" vs "the cat sat on the mat" -> "cat the mat" = 3,
  # P = 3/3, R = 3/6, F = 2.44 * 0.5 / (0.5 + 1.44); a caption with no word in common scores 0; corpus = mean.
  f = 2.44 * 0.5 / (0.5 + 1.44)
  assert captioning.rouge_l(["cat the mat", "blue sky"], [["the cat sat on the mat"], ["green grass"]]) == (
      pytest.approx(f / 2, rel=1e-12))


_CANDIDATES = ["A dog runs on the grass, the dog is brown.", "Two men play tennis on a court.",
               "a cat sitting on a red sofa", "people walking down a busy street in the city", "a bird"]
# Several references per image, of different lengths; repeated words and bigrams ("the dog", "the grass").
_REFERENCES = [["A brown dog runs on the green grass.", "the dog is running on grass",
                "a brown dog playing outside on the grass in the sun"],
               ["Two men are playing tennis.", "men play tennis on a clay court", "two tennis players on a court"],
               ["A cat sits on a red couch.", "the cat is sitting on the sofa", "a black cat on a red sofa"],
               ["a busy city street with people walking", "people walk down the street",
                "many people walking down a big city street"],
               ["a small bird on a branch", "a bird sitting in a tree"]]


def _coco_inputs(candidates, references):
  """pycocoevalcap's gts and res dicts of the captions as `tokenize` splits them."""
  gts = {i: [" ".join(captioning.tokenize(r)) for r in rs] for i, rs in enumerate(references)}
  res = {i: [" ".join(captioning.tokenize(c))] for i, c in enumerate(candidates)}
  return gts, res


def test_caption_metrics_agree_with_pycocoevalcap():
  gts, res = _coco_inputs(_CANDIDATES, _REFERENCES)
  got = captioning.caption_metrics(_CANDIDATES, _REFERENCES, meteor=False)
  assert set(got) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"}
  # Every order has corpus matches, where pycocoevalcap's (matches + 1e-15) / (n-grams + 1e-9) differs from ours
  # by a relative 1e-10 or so.
  want_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  for k in range(1, 5):
    assert got[f"bleu{k}"] == pytest.approx(want_bleu[k - 1], rel=1e-9)
    assert captioning.bleu(_CANDIDATES, _REFERENCES, max_n=k) == got[f"bleu{k}"]
  assert got["bleu4"] < got["bleu1"] < 1.0  # Neither 0 nor perfect: the comparison means something.
  want_rouge, _ = Rouge().compute_score(gts, res)
  assert got["rouge_l"] == pytest.approx(want_rouge, rel=1e-12) == captioning.rouge_l(_CANDIDATES, _REFERENCES)
  want_cider, want_per_image = Cider().compute_score(gts, res)  # df over these 5 images, as ours.
  score, per_image = captioning.cider(_CANDIDATES, _REFERENCES, per_image=True)
  np.testing.assert_allclose(per_image, want_per_image, rtol=1e-9)
  assert got["cider"] == score == pytest.approx(want_cider, rel=1e-9)


def test_caption_metrics_leave_meteor_out_without_java(monkeypatch):
  monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
  assert not captioning.meteor_available()
  assert "meteor" not in captioning.caption_metrics(_CANDIDATES, _REFERENCES)


@pytest.mark.slow
@pytest.mark.skipif(not captioning.meteor_available(), reason="METEOR needs pycocoevalcap and java")
def test_caption_metrics_meteor_is_pycocoevalcaps_on_the_tokenized_captions():
  from pycocoevalcap.meteor.meteor import Meteor
  want, _ = Meteor().compute_score(*_coco_inputs(_CANDIDATES, _REFERENCES))
  got = captioning.caption_metrics(_CANDIDATES, _REFERENCES)["meteor"]
  assert got == want and 0.0 < got < 1.0


# --- VQA ---------------------------------------------------------------------------------------------------------


# Expected values derived by hand from the official VQA evaluation's rules (vqaEval.py, GT-Vision-Lab VQA API):
# punctuation (; / [ ] " { } ( ) = + \ _ - > < @ ` , ? !) is deleted when next to a space or when the answer has a
# digit,digit comma, else spaced; periods not before a digit are deleted; then lowercase, number words up to ten,
# articles dropped, apostrophes restored in contractions.
@pytest.mark.parametrize("raw, want", [
    ("Two dogs.", "2 dogs"),                # "." before no digit is deleted; "two" -> "2".
    ("ten", "10"), ("None", "0"),
    ("eleven", "eleven"),                   # The number words stop at ten.
    ("3.5", "3.5"), ("3.", "3"), (".5", ".5"),  # Only a period followed by a digit stays.
    ("e.g.", "eg"),
    ("1,000", "1000"),                      # A digit,digit comma: every mark is deleted, not spaced.
    ("1,000-2", "10002"),                   # ... including the "-", which alone would become a space.
    ("yes!", "yes"),                        # "!" touches no space: a space, then split away.
    ("t-shirt", "t shirt"),
    ("red, white", "red white"),            # ", " occurs: the comma is deleted, the space after it stays.
    ("red,white", "red white"),             # No space next to it and no digit,digit: the comma becomes a space.
    ("red - white", "red white"),           # " -" occurs: deleted, leaving two spaces, which the split collapses.
    ("(one) dog", "1 dog"),                 # "(" touches no space -> " "; ") " occurs -> ")" deleted.
    ("a man's hat", "man's hat"),           # The apostrophe is not a listed mark; "a" is an article.
    ("What's that?", "what's that"),
    ("isnt it", "isn't it"), ("Dont", "don't"), ("youre", "you're"),  # Apostrophes restored ...
    ("don't", "don't"),                     # ... and kept (mmjax used to expand this to "do not").
    ("couldnt've", "couldn't've"),          # Keys miss exactly one apostrophe ...
    ("couldntve", "couldntve"),             # ... so this one, missing both, is not in the table.
    ("im", "im"),                           # The official key is "Im", never matched after lowercasing.
    ("  Red   and  BLUE ", "red and blue"), ("the\tcat\n", "cat"),
    ("a -b", "b"),                          # " -" occurs, so "-" is deleted: "a b" -> "b".
    ("a-\tb", "b"),                         # The tab becomes a space first, so "- " occurs and "-" is deleted.
    ("." * 33 + "x", ".x"),                 # The official removes at most 32 periods (re.UNICODE passed as count).
])
def test_normalize_answer_follows_the_official_vqa_rules(raw, want):
  assert vqa.normalize_answer(raw) == want


def test_exact_match_accepts_a_string_or_a_list_of_answers():
  predictions = ["Two.", "yes", "blue", "the cat"]
  references = ["2", ["no", "Yes!"], "red", ["dog", "a cat"]]
  assert vqa.exact_match(predictions, references) == 3 / 4  # Hits: "2", "yes", "cat"; "blue" != "red".


def test_vqa_accuracy_averages_over_leave_one_out_subsets():
  humans = ["2", "2", "2", "3", "3", "3", "3", "4", "4", "red"]  # Already normalised, as VQAv2's answers are.
  # Prediction matched by m of the 10 humans. Leaving out one of the m matching humans leaves m - 1 matches,
  # leaving out one of the other 10 - m leaves m; each subset scores min(1, matches / 3):
  #   "3",    m = 4: (6 * min(1, 4/3) + 4 * min(1, 3/3)) / 10 = (6 + 4) / 10          = 1.0
  #   "Two",  m = 3: (7 * min(1, 3/3) + 3 * min(1, 2/3)) / 10 = (7 + 2) / 10          = 0.9
  #   "4",    m = 2: (8 * 2/3 + 2 * 1/3) / 10 = (16/3 + 2/3) / 10 = 6 / 10            = 0.6
  #   "Red.", m = 1: (9 * 1/3 + 1 * 0) / 10 = 3 / 10                                   = 0.3
  #   "5",    m = 0: 0
  cases = {"3": 1.0, "Two": 0.9, "4": 0.6, "Red.": 0.3, "5": 0.0}
  for pred, want in cases.items():
    assert vqa.vqa_accuracy([pred], [humans]) == pytest.approx(want, abs=1e-12)
  assert vqa.vqa_accuracy(list(cases), [humans] * 5) == pytest.approx((1.0 + 0.9 + 0.6 + 0.3 + 0.0) / 5)
  with pytest.raises(DataError, match=r"references_lists\[0\] has 1 answers"):
    vqa.vqa_accuracy(["yes"], [["yes"]])


def test_vqa_accuracy_matches_an_explicit_enumeration_of_the_9_of_10_subsets():
  rng = np.random.default_rng(0)
  vocab = ["yes", "no", "2", "3", "red", "blue"]  # Normalised answers: the official rules leave them as they are.
  humans = [rng.choice(vocab[:k], size=10).tolist() for k in rng.integers(1, len(vocab) + 1, size=60)]
  predictions = rng.choice(vocab, size=60).tolist()
  subsets = list(itertools.combinations(range(10), 9))
  assert len(subsets) == 10 and all(len(set(range(10)) - set(s)) == 1 for s in subsets)
  per_question = [np.mean([min(1.0, sum(answers[j] == pred for j in subset) / 3) for subset in subsets])
                  for pred, answers in zip(predictions, humans)]
  assert vqa.vqa_accuracy(predictions, humans) == pytest.approx(np.mean(per_question), rel=1e-12)
  assert any(len(set(a)) == 1 for a in humans) and 0.0 < np.mean(per_question) < 1.0  # Both branches, mixed scores.


def test_vqa_accuracy_normalises_human_answers_as_the_official_script_does():
  # Humans' answers only lose punctuation, and only when they differ: 9 x "t-shirt" + "shirt" -> 9 x "t shirt",
  # which the prediction "T-shirt!" (normalised: "t shirt") matches, m = 9 -> 1.0.
  assert vqa.vqa_accuracy(["T-shirt!"], [["t-shirt"] * 9 + ["shirt"]]) == 1.0
  # Ten identical answers are left as they are: "t-shirt" never equals the prediction's "t shirt" -> 0.
  assert vqa.vqa_accuracy(["t-shirt"], [["t-shirt"] * 10]) == 0.0
  # Human answers are not lowercased nor their numbers mapped: the prediction "two" -> "2" matches no "Two".
  assert vqa.vqa_accuracy(["two"], [["Two"] * 4 + ["yes"] * 6]) == 0.0
  assert vqa.vqa_accuracy(["two"], [[vqa.normalize_answer(a) for a in ["Two"] * 4 + ["yes"] * 6]]) == 1.0


def test_majority_baseline_picks_the_most_frequent_normalised_answer():
  # Normalised training answers: yes x3 ("yes", "Yes.", and the list whose majority is "yes"), "2" x2, "no" x1.
  train = ["yes", "Yes.", "no", "2", "two", ["yes", "yes", "no"]]
  eval_refs = ["yes", "no", ["Yes!", "yeah"], "2"]
  answer, acc = vqa.majority_baseline(train, eval_refs)
  assert (answer, acc) == ("yes", 2 / 4)  # "yes" matches eval questions 0 and 2.
  assert vqa.majority_baseline(["no", "yes"], ["yes"]) == ("no", 0.0)  # A tie goes to the alphabetically first.
  with pytest.raises(DataError, match="train_answers is empty"):
    vqa.majority_baseline([], ["yes"])


def test_per_type_groups_questions_by_type():
  predictions = ["yes", "no", "2", "red"]
  references = ["yes", "yes", "two", "blue"]
  types = ["yes/no", "yes/no", "number", "other"]
  assert vqa.per_type(predictions, references, types) == {"yes/no": 0.5, "number": 1.0, "other": 0.0}
  humans = [["yes"] * 10, ["no"] * 2 + ["yes"] * 8, ["2"] * 10, ["red"] + ["blue"] * 9]
  got = vqa.per_type(predictions, humans, types, metric=vqa.vqa_accuracy)
  assert got == pytest.approx({"yes/no": (1.0 + 0.6) / 2, "number": 1.0, "other": 0.3})
  with pytest.raises(ConfigError, match="3 question_types"):
    vqa.per_type(predictions, references, types[:3])
