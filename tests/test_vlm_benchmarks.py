"""Benchmarks of a vision-language export (`mmjax.evals.vlm_benchmarks`) on files in their published formats
(a VQAv2 question/annotation pair, a COCO captions JSON, an MMMU-style JSONL), each number against a
reference computed here: VQAv2's leave-one-out accuracy over `itertools.combinations`, option
log-likelihoods from an unpadded forward pass in float64, caption metrics of captions generated here."""
import itertools
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import mmjax
from mmjax.data import vlm_benchmarks as readers
from mmjax.data.transforms import ResizeImage
from mmjax.errors import ConfigError, DataError
from mmjax.evals import captioning, vqa
from mmjax.evals import vlm_benchmarks as bench
from mmjax.generate import answer, make_sequence
from tests.helpers import run_module, untrained_vlm_export

SIZE = 16  # The tiny VLMs' input side; the files below are of other sizes, some not square.
FILE_SIZES = [(16, 16), (24, 20), (40, 32), (18, 30)]  # (height, width)
VQA_QUESTIONS = [  # (image_id, question, answer_type, how many of the 10 humans give the model's answer)
    (9, "Is there a red circle?", "yes/no", 10), (9, "How many objects are in the picture?", "number", 3),
    (42, "What color is the square on the left?", "other", 1), (42, "Is it raining?", "yes/no", 0),
    (7, "How many triangles?", "number", 2), (7, "What shape is the blue object?", "other", 4)]
OTHER_ANSWERS = ["zebra", "7", "no", "blue", "yes", "3"]  # Answers no tiny model gives.
CHOICES = [("What colour is the circle?", ["red", "dark green", "blue"]),
           ("How many objects are there?", ["one", "two"]),
           ("What shape is the red object?", ["a small circle", "square", "triangle", "star"]),
           ("Is the square left of the triangle?", ["yes", "no"])]


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _model_input(path) -> np.ndarray:
  """uint8 [1, SIZE, SIZE, 3]: the file resized as training prepares files."""
  return ResizeImage(SIZE).map({"image": np.asarray(Image.open(path).convert("RGB"))})["image"][None]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  return mmjax.load(untrained_vlm_export(str(tmp_path_factory.mktemp("vlm") / "export"), "llava", SIZE))


def _greedy(loaded, paths, prompts, max_new_tokens):
  """Greedy outputs of `mmjax.generate.answer` on episodes made here (prompts padded to 64 tokens, 4 a batch)."""
  sequence = make_sequence(loaded.model, loaded.tokenizer, 64)
  episodes = [dict(image=_model_input(p), prompts=[t], answers=[]) for p, t in zip(paths, prompts)]
  return answer(loaded.model, loaded.params, sequence, episodes, max_new_tokens=max_new_tokens,
                           batch_size=4)


@pytest.fixture(scope="module")
def vqa_files(loaded, tmp_path_factory):
  """An official-format VQAv2 pair over three COCO-named images; each question's 10 human answers hold the
  (normalised) answer the model gives as often as VQA_QUESTIONS says, found here by `mmjax.generate.answer`."""
  tmp = tmp_path_factory.mktemp("vqav2")
  os.makedirs(tmp / "val2014")
  for n, image_id in enumerate(sorted({q[0] for q in VQA_QUESTIONS})):
    _image(n, FILE_SIZES[n + 1]).save(tmp / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
  questions = [{"image_id": image_id, "question": text, "question_id": image_id * 1000 + n}
               for n, (image_id, text, _, _) in enumerate(VQA_QUESTIONS)]
  predictions = _greedy(loaded, [tmp / "val2014" / f"COCO_val2014_{q['image_id']:012d}.jpg" for q in questions],
                        [f"question: {q['question']} answer:" for q in questions], 10)
  assert all(predictions) and len(set(predictions)) > 1, predictions
  annotations = []
  for q, p, (_, text, answer_type, matches) in zip(questions, predictions, VQA_QUESTIONS):
    humans = [vqa.normalize_answer(p)] * matches + [OTHER_ANSWERS[k % 6] for k in range(10 - matches)]
    annotations.append({"question_type": " ".join(text.lower().split()[:2]), "multiple_choice_answer": humans[0],
                        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                    for k, a in enumerate(humans)],
                        "image_id": q["image_id"], "answer_type": answer_type, "question_id": q["question_id"]})
  meta = {"info": {"description": "test"}, "license": {"name": "test"}, "data_subtype": "val2014"}
  (tmp / "questions.json").write_text(json.dumps({**meta, "task_type": "Open-Ended", "data_type": "mscoco",
                                                  "questions": questions}))
  (tmp / "annotations.json").write_text(json.dumps({**meta, "data_type": "mscoco",
                                                    "annotations": annotations[::-1]}))  # Any order.
  return tmp, predictions


def _official_accuracy(prediction: str, humans: list[str]) -> float:
  """The mean over the 10 sets of 9 humans of min(1, humans giving the normalised prediction / 3)."""
  pred = vqa.normalize_answer(prediction)
  return np.mean([min(1.0, sum(h == pred for h in nine) / 3) for nine in itertools.combinations(humans, 9)])


def test_vqav2_accuracy_overall_and_per_answer_type(loaded, vqa_files):
  tmp, predictions = vqa_files
  questions = readers.read_vqav2(str(tmp / "questions.json"), str(tmp / "annotations.json"), str(tmp / "val2014"))
  assert [q.question for q in questions] == [q[1] for q in VQA_QUESTIONS]  # The questions file's order.
  assert os.path.basename(questions[2].image_path) == "COCO_val2014_000000000042.jpg"
  result = bench.vqav2(loaded, questions, max_len=64, batch_size=4)
  assert [p["answer"] for p in result.predictions] == predictions
  assert [p["question_id"] for p in result.predictions] == [q.question_id for q in questions]
  annotations = {a["question_id"]: a for a in json.load(open(tmp / "annotations.json"))["annotations"]}
  scores = [_official_accuracy(p, [h["answer"] for h in annotations[q.question_id]["answers"]])
            for p, q in zip(predictions, questions)]
  np.testing.assert_allclose(scores, [1.0, 0.9, 0.3, 0.0, 0.6, 1.0])
  metrics = result.metrics
  assert metrics["accuracy"] == pytest.approx(np.mean(scores))
  for answer_type in ("yes/no", "number", "other"):
    rows = [s for s, q in zip(scores, VQA_QUESTIONS) if q[2] == answer_type]
    assert metrics[f"accuracy/{answer_type}"] == pytest.approx(np.mean(rows))
    assert metrics[f"questions/{answer_type}"] == 2
  assert metrics["questions"] == 6 and metrics["images"] == 3


def test_vqav2_from_the_command_line_writes_results_and_official_predictions(loaded, vqa_files):
  tmp, _ = vqa_files
  run_module("mmjax.evaluate", "--export", loaded.path, "--benchmark", "vqav2", "--data", "questions.json",
             "--annotations", "annotations.json", "--image_root", "val2014", "--batch_size", "8", "--out", "vqa.json",
             "--predictions", "answers.json", cwd=tmp)
  questions = readers.read_vqav2(str(tmp / "questions.json"), str(tmp / "annotations.json"), str(tmp / "val2014"))
  want = bench.vqav2(loaded, questions, batch_size=8)
  result = json.load(open(tmp / "vqa.json"))
  assert result["task"] == "vqav2" and result["model"] == loaded.path and result["metrics"] == want.metrics
  assert json.load(open(tmp / "answers.json")) == want.predictions


def test_coco_captions_metrics_of_the_generated_captions(loaded, tmp_path):
  os.makedirs(tmp_path / "val2014")
  os.makedirs(tmp_path / "annotations")
  images, annotations = [], []
  for n, image_id in enumerate([391895, 522418, 184613]):
    name = f"COCO_val2014_{image_id:012d}.jpg"
    _image(10 + n, FILE_SIZES[n]).save(tmp_path / "val2014" / name)
    images.append({"license": 1, "file_name": name, "coco_url": "", "height": FILE_SIZES[n][0],
                   "width": FILE_SIZES[n][1], "date_captured": "2013-11-14 11:18:45", "flickr_url": "", "id": image_id})
  captions = ["a photo of a red circle", "A small blue square. ", "two objects on a white background\n",
              "a green triangle above a star", "an image of three shapes", "the red star is right of the circle"]
  for k in range(11):  # 4, 4 and 3 captions, interleaved as in the file.
    annotations.append({"image_id": images[k % 3]["id"], "id": 100 + k, "caption": captions[k % 6]})
  path = tmp_path / "annotations" / "captions_val2014.json"
  path.write_text(json.dumps({"info": {}, "images": images, "licenses": [], "annotations": annotations}))
  data = readers.read_coco_captions(str(path), str(tmp_path / "val2014"))
  result = bench.coco_captions(loaded, data, max_new_tokens=10, max_len=64, batch_size=4, meteor=False)  # No JVM.
  raw = json.load(open(path))
  references = [[a["caption"] for a in raw["annotations"] if a["image_id"] == image["id"]] for image in raw["images"]]
  assert [len(r) for r in references] == [4, 4, 3]
  generated = _greedy(loaded, [tmp_path / "val2014" / image["file_name"] for image in raw["images"]],
                      ["caption:"] * 3, 10)
  assert [p["caption"] for p in result.predictions] == generated
  assert [p["image_id"] for p in result.predictions] == [391895, 522418, 184613]
  assert result.metrics == {**captioning.caption_metrics(generated, references, meteor=False), "images": 3}
  assert set(result.metrics) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider", "images"}


def _option_log_likelihoods(loaded, images: list[np.ndarray], prompts: list[str], options: list[list[str]]):
  """Per question, the sum of float64 log-softmax probabilities of each option's tokens and the terminator
  after [image tokens] + prompt, from one forward pass without a mask: each sequence is right-padded, which
  a causal model never reads before the padding; `images` uint8 [1, S, S, 3]."""
  model, tokenizer = loaded.model, loaded.tokenizer
  terminator = getattr(model, "end_of_chunk_id", None) or tokenizer.eos_id
  rows = []
  for image, prompt, opts in zip(images, prompts, options):
    head = [model.image_token_id] * model.num_image_tokens + tokenizer.ids(prompt)
    rows += [(image, len(head), head + tokenizer.ids(o) + [terminator]) for o in opts]
  width = max(len(r[2]) for r in rows)
  tokens = np.array([r[2] + [tokenizer.pad_id] * (width - len(r[2])) for r in rows], np.int32)
  pixels = np.stack([r[0] for r in rows]).astype(np.float32) / 127.5 - 1.0
  logits = np.asarray(jax.jit(model.apply)({"params": loaded.params}, pixels, tokens)[0], np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  scores = iter([sum(logp[i, t - 1, ids[t]] for t in range(start, len(ids))) for i, (_, start, ids) in enumerate(rows)])
  return [np.array([next(scores) for _ in opts]) for opts in options]


@pytest.mark.parametrize("kind", ["llava", "flamingo"])
def test_multiple_choice_picks_the_most_likely_option(kind, loaded, tmp_path):
  if kind != "llava":  # Flamingo: one image token, `<|endofchunk|>` ends the answer, image size from its params.
    loaded = mmjax.load(untrained_vlm_export(str(tmp_path / "export"), kind, SIZE))
  os.makedirs(tmp_path / "images")
  for n in range(len(CHOICES)):
    _image(20 + n, FILE_SIZES[n]).save(tmp_path / "images" / f"{n}.png")
  reference = _option_log_likelihoods(loaded, [_model_input(tmp_path / "images" / f"{n}.png") for n in range(4)],
                                      [f"question: {q} answer:" for q, _ in CHOICES], [o for _, o in CHOICES])
  best = [int(np.argmax(r)) for r in reference]
  # The answer as a letter, an index, a lower-case letter; the last question's answer is not the model's choice.
  answers = ["ABCD"[best[0]], best[1], "abcd"[best[2]], "AB"[1 - best[3]]]
  lines = [json.dumps({"id": f"q{n}", "image": f"images/{n}.png", "question": q, "options": o, "answer": a})
           for n, ((q, o), a) in enumerate(zip(CHOICES, answers))]
  (tmp_path / "mc.jsonl").write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")
  questions = readers.read_multiple_choice(str(tmp_path / "mc.jsonl"))
  assert [q.answer for q in questions] == [best[0], best[1], best[2], 1 - best[3]]
  result = bench.multiple_choice(loaded, questions, batch_size=4)
  for p, r, b in zip(result.predictions, reference, best):
    np.testing.assert_allclose(p["log_likelihoods"], r, rtol=1e-5, atol=1e-4)
    assert p["prediction"] == "ABCD"[b]
  assert [p["id"] for p in result.predictions] == ["q0", "q1", "q2", "q3"]
  assert result.metrics == {"accuracy": 0.75, "questions": 4}


def test_vision_input_size_from_the_config_or_the_vit_parameters(loaded, tmp_path):
  assert bench.vision_input_size(loaded.model_config, loaded.params) == SIZE  # LLaVA records it.
  blip2 = mmjax.load(untrained_vlm_export(str(tmp_path / "blip2"), "blip2", 24))
  assert "image_size" not in blip2.model_config
  assert bench.vision_input_size(blip2.model_config, blip2.params) == 24  # 3 x 3 patches of 8.
  with pytest.raises(ConfigError, match="give image_size"):
    bench.vision_input_size({"kind": "flamingo"}, {"vision": {"embedding": {"kernel": np.zeros((8, 8, 3, 4))}}})


def test_benchmarks_refuse_a_two_tower_export_and_a_short_max_len(loaded, vqa_files):
  tmp, _ = vqa_files
  questions = readers.read_vqav2(str(tmp / "questions.json"), str(tmp / "annotations.json"), str(tmp / "val2014"))
  two_tower = mmjax.bundle.LoadedModel(None, {}, None, {"image_size": 32, "text": {}})
  with pytest.raises(ConfigError, match="vision-language model"):
    bench.vqav2(two_tower, questions)
  with pytest.raises(DataError, match=r"question_id 9000 needs \d+ tokens .*max_len=8 is too short for 6 item"):
    bench.vqav2(loaded, questions, max_len=8)


def test_reader_errors_name_the_file_and_the_culprit(vqa_files, tmp_path):
  tmp, _ = vqa_files
  questions, annotations = tmp / "questions.json", json.load(open(tmp / "annotations.json"))
  del annotations["annotations"][2]  # Reversed: the annotation of questions[3].
  (tmp_path / "annotations.json").write_text(json.dumps(annotations))
  with pytest.raises(DataError, match=r"annotations.json: no annotation for question_id 42003 .*questions\[3\]"):
    readers.read_vqav2(str(questions), str(tmp_path / "annotations.json"), str(tmp / "val2014"))
  with pytest.raises(DataError, match=r"image file .*COCO_val2014_000000000009.jpg not found \(3 of 3 missing\)"):
    readers.read_vqav2(str(questions), str(tmp / "annotations.json"), str(tmp_path))
  for k, v in [("answer_type", None), ("answers", "yes")]:
    broken = json.load(open(tmp / "annotations.json"))
    broken["annotations"][0].pop(k) if v is None else broken["annotations"][0].update({k: v})
    (tmp_path / "annotations.json").write_text(json.dumps(broken))
    with pytest.raises(DataError, match=rf"annotations\[0\] \(question_id 7005\) (lacks '{k}'|has {k}='yes')"):
      readers.read_vqav2(str(questions), str(tmp_path / "annotations.json"), str(tmp / "val2014"))
  _image(0, (16, 16)).save(tmp_path / "a.png")
  good = {"image": "a.png", "question": "q?", "options": ["x", "y"], "answer": "B"}
  for bad, message in [("{not json", "line 2: not a JSON object"),
                       (json.dumps({**good, "answer": "C"}), r"line 2: answer 'C' names no option; there are 2"),
                       (json.dumps({**good, "options": ["x"]}), "line 2: 'options' must be a list of at least 2"),
                       (json.dumps({"image": "a.png", "question": "q?"}), r"line 2: missing \['options', 'answer'\]")]:
    (tmp_path / "mc.jsonl").write_text(json.dumps(good) + "\n" + bad + "\n")
    with pytest.raises(DataError, match=rf"mc.jsonl {message}"):
      readers.read_multiple_choice(str(tmp_path / "mc.jsonl"))
  (tmp_path / "mc.jsonl").write_text(json.dumps({**good, "options": "['x', 'y']", "answer": 1}))  # MMMU's repr.
  assert readers.read_multiple_choice(str(tmp_path / "mc.jsonl"))[0][3:] == (["x", "y"], 1)
  coco = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 2, "caption": "a"}]}
  (tmp_path / "captions.json").write_text(json.dumps(coco))
  with pytest.raises(DataError, match=r"captions.json: annotations\[0\] has image_id 2, which 'images' does not list"):
    readers.read_coco_captions(str(tmp_path / "captions.json"))
  coco["annotations"] = []
  (tmp_path / "captions.json").write_text(json.dumps(coco))
  with pytest.raises(DataError, match="captions.json: image_id 1 has no caption"):
    readers.read_coco_captions(str(tmp_path / "captions.json"))
