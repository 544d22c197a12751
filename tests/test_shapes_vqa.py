"""Questions and answers about shapes scenes, checked against facts written out by hand."""
import collections
import random

import numpy as np
import pytest

from mmjax.data import sequences, shapes, shapes_vqa
from mmjax.data.tokenizer import END_OF_CHUNK, IMAGE_TOKEN, load_tokenizer
from mmjax.errors import DataError

RED, BLUE = shapes.COLOUR_NAMES.index("red"), shapes.COLOUR_NAMES.index("blue")
CIRCLE, SQUARE = shapes.SHAPES.index("circle"), shapes.SHAPES.index("square")


def test_every_question_about_a_hand_made_scene_is_true():
  # A red circle in the top-left cell (0) and a blue square in the top-right cell (2).
  scene = [shapes._Object(RED, CIRCLE, False, 0), shapes._Object(BLUE, SQUARE, True, 2)]
  facts = {
      "how many objects are there?": "two",
      "what colour is the circle?": "red", "what colour is the square?": "blue",
      "what shape is the red object?": "circle", "what shape is the blue object?": "square",
      "is the circle left of the square?": "yes", "is the circle right of the square?": "no",
      "is the circle above the square?": "no", "is the circle below the square?": "no",
      "is the square right of the circle?": "yes", "is the square left of the circle?": "no",
      "is the square above the circle?": "no", "is the square below the circle?": "no",
  }
  asked = collections.Counter()
  for seed in range(400):
    text, answer, kind = shapes_vqa.question(random.Random(seed), scene)
    assert facts[text] == answer, text
    asked[kind] += 1
  assert set(asked) == set(shapes_vqa.QUESTION_TYPES)


def test_questions_avoid_ambiguous_references():
  # Two circles: "the circle" would be ambiguous, so only count and shape-by-colour questions remain.
  scene = [shapes._Object(RED, CIRCLE, False, 0), shapes._Object(BLUE, CIRCLE, False, 8)]
  kinds = {shapes_vqa.question(random.Random(seed), scene)[2] for seed in range(100)}
  assert kinds == {"count", "shape"}


def test_source_is_deterministic_balanced_and_its_colours_are_in_the_image():
  source = shapes_vqa.ShapesVQASource(seed=0, image_size=32)
  records = [source.record(i) for i in range(600)]
  again = shapes_vqa.ShapesVQASource(seed=0, image_size=32).record(5)
  np.testing.assert_array_equal(again["image"], records[5]["image"])
  assert again["prompt"] == records[5]["prompt"]
  kinds = collections.Counter(r["kind"] for r in records)
  assert set(kinds) == set(shapes_vqa.QUESTION_TYPES) | {shapes_vqa.CAPTION}
  relation = collections.Counter(r["answer"] for r in records if r["kind"] == "relation")
  assert abs(relation["yes"] - relation["no"]) <= 0.3 * sum(relation.values())
  for r in records:
    if r["kind"] == "colour":  # Some pixels lie within colour jitter plus noise of the answer's colour.
      distance = np.abs(r["image"].astype(int) - shapes.COLOURS[r["answer"]]).max(axis=-1)
      assert (distance <= shapes.COLOUR_JITTER + shapes.NOISE).sum() >= 9, r["prompt"]


def test_eval_and_few_shot_sets_come_from_their_own_streams():
  train = shapes_vqa.ShapesVQASource(seed=0, image_size=32)
  evals = shapes_vqa.eval_set(seed=0, image_size=32, n=8)
  assert all(not np.array_equal(e["image"], train.record(i)["image"]) for i, e in enumerate(evals))
  episodes = shapes_vqa.few_shot_set(seed=0, image_size=32, n=8, shots=4)
  assert [len(e) for e in episodes] == [5] * 8
  assert all(e[-1]["prompt"] == q["prompt"] for e, q in zip(episodes, evals))
  assert all(d["kind"] != shapes_vqa.CAPTION for e in episodes for d in e)


def test_described_questions_follow_their_own_scenes_caption():
  plain = shapes_vqa.ShapesVQASource(image_size=16, caption_fraction=0.25)
  described = shapes_vqa.ShapesVQASource(image_size=16, caption_fraction=0.25, described_fraction=1.0)
  checked = collections.Counter()
  for i in range(200):
    want, got = plain.record(i), described.record(i)
    np.testing.assert_array_equal(got["image"], want["image"])
    assert (got["answer"], got["kind"]) == (want["answer"], want["kind"])
    if want["kind"] == shapes_vqa.CAPTION:  # Another description of the scene: the same objects.
      description, prompt = got["prompt"].rsplit(" ", 1)
      assert description.startswith("scene: ") and prompt == want["prompt"]
      names = [shapes.class_name(c, s) for c in range(len(shapes.COLOUR_NAMES)) for s in range(len(shapes.SHAPES))]
      assert [n in description for n in names] == [n in want["answer"] for n in names]
      checked["caption"] += 1
      continue
    caption, question = got["prompt"].split(" question: ")
    assert caption.startswith("scene: ") and f"question: {question}" == want["prompt"]
    words = question.split()
    if want["kind"] == "colour":  # "what colour is the circle?": the caption names "<answer> circle".
      assert f"{want['answer']} {words[-2].rstrip('?')}" in caption
    if want["kind"] == "shape":  # "what shape is the red object?": the caption names "red <answer>".
      assert f"{words[4]} {want['answer']}" in caption
    checked[want["kind"]] += 1
  assert checked["colour"] > 10 and checked["shape"] > 10 and checked["caption"] > 10
  half = shapes_vqa.ShapesVQASource(image_size=16, caption_fraction=0.0, described_fraction=0.5)
  assert 70 < sum(half.record(i)["prompt"].startswith("scene: ") for i in range(200)) < 130


def test_vlm_tokenizer_has_media_markers_as_single_pieces():
  tok = load_tokenizer("shapes_vlm")
  image, end = tok.piece_id(IMAGE_TOKEN), tok.piece_id(END_OF_CHUNK)
  ids = tok.ids(f"{IMAGE_TOKEN} question: how many objects are there? answer: two{END_OF_CHUNK}")
  assert ids.count(image) == 1 and ids[-1] == end
  assert tok.decode(ids) == f"{IMAGE_TOKEN} question: how many objects are there? answer: two{END_OF_CHUNK}"


def test_missing_special_piece_is_named():
  with pytest.raises(DataError, match="no piece '<image>'"):
    load_tokenizer("shapes").piece_id(IMAGE_TOKEN)


def test_sequences_put_images_prompts_and_answers_in_order_with_loss_on_answers():
  tok = load_tokenizer("shapes_vlm")
  image, end = tok.piece_id(IMAGE_TOKEN), tok.piece_id(END_OF_CHUNK)
  source = shapes_vqa.ShapesVQASource(seed=0, image_size=16, media_per_record=2)
  ep = source[3]
  assert ep["image"].shape == (2, 16, 16, 3) and ep["prompts"][1] == source.record(7)["prompt"]
  build = sequences.BuildSequence(tok, max_len=64, image_token_id=image, tokens_per_image=3, terminator=end)
  out = build.map(ep)
  parts = [[image] * 3 + tok.ids(ep["prompts"][0]), tok.ids(ep["answers"][0]) + [end],
           [image] * 3 + tok.ids(ep["prompts"][1]), tok.ids(ep["answers"][1]) + [end]]
  want = [i for p in parts for i in p]
  pad = 64 - len(want)
  assert out["tokens"].tolist() == [tok.pad_id] * pad + want
  assert out["mask"].tolist() == [False] * pad + [True] * len(want)
  assert out["targets"][:-1].tolist() == out["tokens"][1:].tolist()
  # A weight of 1 exactly where the next token is part of an answer (its terminator included).
  answer_pos = [pad + sum(map(len, parts[:k])) + i for k in (1, 3) for i in range(len(parts[k]))]
  assert np.nonzero(out["weights"])[0].tolist() == [p - 1 for p in answer_pos]
  prompt, mask = build.prompt(ep)  # Generation prompt: the last answer is left out.
  assert prompt[mask].tolist() == [i for p in parts[:3] for i in p]
  lm = sequences.BuildSequence(tok, max_len=64, image_token_id=None, tokens_per_image=0, terminator=tok.eos_id,
                               loss_on="all")
  out = lm.map(ep)
  assert "image" not in out and out["weights"].sum() == out["mask"].sum() - 1
  with pytest.raises(DataError, match="data.max_len=8"):
    sequences.BuildSequence(tok, max_len=8, image_token_id=image, tokens_per_image=3, terminator=end).map(ep)
