"""Caption (BLEU, CIDEr-D) and VQA metrics against examples worked by hand; the arithmetic is spelled out inline."""
import math

import numpy as np
import pytest
from nltk.translate import bleu_score as nltk_bleu

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


def test_bleu_agrees_with_nltk_corpus_bleu():
  candidates = ["a cat sat on the mat", "there is a dog", "two men play tennis on a court today"]
  references = [["the cat sat on the mat", "a cat is on a mat"],
                ["there is a big dog here", "a dog is sitting in the garden"],
                ["two men are playing tennis", "men play tennis on a clay court"]]
  want = nltk_bleu.corpus_bleu([[r.split() for r in rs] for rs in references], [c.split() for c in candidates])
  assert captioning.bleu(candidates, references) == pytest.approx(want, rel=1e-9)


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


# --- VQA ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, want", [
    ("Two.", "2"), ("the red circle", "red circle"), ("yes!", "yes"), ("2.5", "2.5"), ("An apple", "apple"),
    ("  Red   and  BLUE ", "red and blue"), ("1,000", "1000"), ("t-shirt", "t shirt"), ("don't", "do not"),
    ("Dont", "do not"), ("What's that?", "what is that"), ("ten", "10"), ("3.", "3"),
])
def test_normalize_answer(raw, want):
  assert vqa.normalize_answer(raw) == want


def test_exact_match_accepts_a_string_or_a_list_of_answers():
  predictions = ["Two.", "yes", "blue", "the cat"]
  references = ["2", ["no", "Yes!"], "red", ["dog", "a cat"]]
  assert vqa.exact_match(predictions, references) == 3 / 4  # Hits: "2", "yes", "cat"; "blue" != "red".


def test_vqa_accuracy_averages_over_leave_one_out_subsets():
  humans = ["2", "2", "two", "3", "3", "3", "3", "4", "4", "red"]  # Normalised: "2" x3, "3" x4, "4" x2, "red" x1.
  # Prediction matched by m of the 10 humans. Leaving out one of the m matching humans leaves m - 1 matches,
  # leaving out one of the other 10 - m leaves m; each subset scores min(1, matches / 3):
  #   "3",   m = 4: (6 * min(1, 4/3) + 4 * min(1, 3/3)) / 10 = (6 + 4) / 10          = 1.0
  #   "Two", m = 3: (7 * min(1, 3/3) + 3 * min(1, 2/3)) / 10 = (7 + 2) / 10          = 0.9
  #   "4",   m = 2: (8 * 2/3 + 2 * 1/3) / 10 = (16/3 + 2/3) / 10 = 6 / 10            = 0.6
  #   "red", m = 1: (9 * 1/3 + 1 * 0) / 10 = 3 / 10                                   = 0.3
  #   "5",   m = 0: 0
  cases = {"3": 1.0, "Two": 0.9, "4": 0.6, "red": 0.3, "5": 0.0}
  for pred, want in cases.items():
    assert vqa.vqa_accuracy([pred], [humans]) == pytest.approx(want, abs=1e-12)
  assert vqa.vqa_accuracy(list(cases), [humans] * 5) == pytest.approx((1.0 + 0.9 + 0.6 + 0.3 + 0.0) / 5)
  with pytest.raises(DataError, match=r"references_lists\[0\] has 1 answers"):
    vqa.vqa_accuracy(["yes"], [["yes"]])


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
