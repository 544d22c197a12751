"""Benchmarks of a vision-language model export (LLaVA, Flamingo, BLIP-2) on files in their published
formats, read by `mmjax.data.vlm_benchmarks`: VQAv2, COCO captions and multiple choice (MMMU-style).

Each takes `loaded` (what `mmjax.bundle.load` returns: model, params, tokenizer and `model_config`)
and returns `Result(metrics, predictions)`, the predictions one dict per item (for VQAv2 and COCO in
the official results format, [{"question_id", "answer"}] and [{"image_id", "caption"}]).

Prompts are those the shapes VLMs were trained on (`mmjax.data.shapes_vqa`), each after the image's
tokens; `prompt` changes them (`{question}` and `{options}` are filled where present):

  VQAv2            "question: {question} answer:"    -> a greedy answer
  COCO captions    "caption:"                         -> a greedy caption
  multiple choice  "question: {question} answer:"    each option scored as the answer to it

Multiple choice scores an option by the log-likelihood of its tokens and the answer terminator (EOS;
Flamingo's `<|endofchunk|>`) after the prompt: the sum of their log-probabilities, not the mean, so
shorter options are not penalised for length. The option with the highest score is the model's choice
(the first one on a tie). `{options}` is "A. <first> B. <second> ..." for prompts that list them.

Images (any size) are resized as training prepares files (shorter side to the model's input size,
bilinear, centre crop; `mmjax.data.transforms.ResizeImage`), read a chunk of items at a time.
`max_len` is the sequence length in tokens, image tokens included (a recipe's `data.max_len`); by
default the longest prompt of the data (rounded up to a multiple of 8), so nothing is cut.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import numpy as np

from mmjax.data import sequences, shapes_vqa
from mmjax.data.folder import load_image
from mmjax.data.transforms import ResizeImage
from mmjax.data import vlm_benchmarks as readers
from mmjax.data.vlm_benchmarks import LETTERS, CaptionedImage, ChoiceQuestion, VQAQuestion
from mmjax.errors import ConfigError, DataError
from mmjax.evals import captioning, vqa
from mmjax.generate import answer, answer_log_likelihoods, make_sequence

VLM_KINDS = ("llava", "flamingo", "blip2")
BENCHMARKS = ("vqav2", "coco_captions", "multiple_choice")
QUESTION_PROMPT = shapes_vqa.QUESTION_PROMPT.format("{question}")
CAPTION_PROMPT = shapes_vqa.CAPTION_PROMPT
_CHUNK_BATCHES = 16  # Items read (images decoded) at a time: this many batches.


class Result(NamedTuple):
  metrics: dict
  predictions: list[dict]


def vision_input_size(model_config: dict, params) -> int:
  """The side of the square images the export's model takes.

  LLaVA's model config records it (`image_size`). Flamingo's and BLIP-2's do not: their vision tower
  takes the size training gave it (the recipe's `data.image_size`, which the export does not keep). A
  ViT with learned position embeddings (the default) fixes it: `vision/pos_embedding` holds one row per
  patch of a square grid, and `vision/embedding/kernel` is [patch, patch, 3, width], so the side is
  sqrt(rows) * patch. Other towers (sincos2d positions, Swin) raise ConfigError: pass `image_size`."""
  if "image_size" in model_config:
    return int(model_config["image_size"])
  shapes = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(getattr(k, "key", None) for k in path)
    if keys[-2:] == ("vision", "pos_embedding"):
      shapes["positions"] = leaf.shape[1]
    elif keys[-3:] == ("vision", "embedding", "kernel"):
      shapes["patch"] = leaf.shape[0]
  side = math.isqrt(shapes.get("positions", 0))
  if "patch" not in shapes or not side or side * side != shapes["positions"]:
    raise ConfigError(f"the {model_config.get('kind')!r} export records no image size and its vision tower has no "
                      "learned position embeddings of a square grid to read it from: give image_size")
  return side * shapes["patch"]


@dataclasses.dataclass
class _Setup:
  model: Any
  params: Any
  sequence: sequences.BuildSequence
  image_size: int
  batch_size: int


def _setup(loaded, image_size: int | None, batch_size: int) -> _Setup:
  kind = loaded.model_config.get("kind")
  if kind not in VLM_KINDS:
    raise ConfigError(f"this export holds a {kind or 'two-tower model'!r}; these benchmarks take a vision-language "
                      f"model, one of {VLM_KINDS}")
  if batch_size < 1:
    raise ConfigError(f"batch_size={batch_size} must be at least 1")
  size = image_size or vision_input_size(loaded.model_config, loaded.params)
  sequence = make_sequence(loaded.model, loaded.tokenizer, max_len=0)
  return _Setup(loaded.model, jax.device_put(loaded.params), sequence, size, batch_size)


def _fit(setup: _Setup, texts: list[tuple[list[str], list[str]]], names: list[str], max_len: int | None) -> None:
  """Sets the sequence length to `max_len`, or to the longest of `texts` ((prompts, answers) per sequence,
  rounded up to a multiple of 8); DataError naming the first item (`names`) that does not fit."""
  lengths = [len(setup.sequence.ids(prompts, answers)[0]) for prompts, answers in texts]
  if max_len is None:
    max_len = -(-max(lengths) // 8) * 8
  too_long = [i for i, n in enumerate(lengths) if n > max_len]
  if too_long:
    i = too_long[0]
    raise DataError(f"{names[i]} needs {lengths[i]} tokens (image tokens included); max_len={max_len} is too short "
                    f"for {len(too_long)} item(s); raise it, or leave it unset to fit the longest")
  setup.sequence = dataclasses.replace(setup.sequence, max_len=max_len)


def _chunks(setup: _Setup, paths: list[str]):
  """(start, uint8 [1, S, S, 3] images) for each chunk of items, each distinct file of a chunk read once."""
  chunk = setup.batch_size * _CHUNK_BATCHES
  resize = ResizeImage(setup.image_size)
  for start in range(0, len(paths), chunk):
    read = {}
    for path in paths[start:start + chunk]:
      if path not in read:
        read[path] = resize.map({"image": load_image(path)})["image"][None]
    yield start, [read[p] for p in paths[start:start + chunk]]


def _generate(setup: _Setup, paths: list[str], prompts: list[str], names: list[str], max_new_tokens: int,
              max_len: int | None) -> list[str]:
  _fit(setup, [([p], []) for p in prompts], names, max_len)
  out = []
  for start, images in _chunks(setup, paths):
    episodes = [dict(image=image, prompts=[prompts[start + i]], answers=[]) for i, image in enumerate(images)]
    out += answer(setup.model, setup.params, setup.sequence, episodes, max_new_tokens=max_new_tokens,
                  batch_size=setup.batch_size)
  return out


def _options_text(options: list[str]) -> str:
  return " ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def vqav2(loaded, questions: list[VQAQuestion], *, prompt: str = QUESTION_PROMPT, max_new_tokens: int = 10,
          max_len: int | None = None, batch_size: int = 64, image_size: int | None = None) -> Result:
  """Greedy answers to `questions` (`read_vqav2`), scored by the VQAv2 soft accuracy (`vqa.vqa_accuracy`:
  min(1, matching humans / 3) over the 10 leave-one-out subsets, answers normalised) overall and per
  answer type, with counts: {accuracy, accuracy/<type>, questions, questions/<type>, images}."""
  setup = _setup(loaded, image_size, batch_size)
  answers = _generate(setup, [q.image_path for q in questions], [prompt.format(question=q.question) for q in questions],
                      [f"question_id {q.question_id}" for q in questions], max_new_tokens, max_len)
  references, types = [q.answers for q in questions], [q.answer_type for q in questions]
  metrics = {"accuracy": vqa.vqa_accuracy(answers, references)}
  per_type = vqa.per_type(answers, references, types, metric=vqa.vqa_accuracy)
  metrics.update({f"accuracy/{t}": per_type[t] for t in sorted(per_type)})
  metrics["questions"] = len(questions)
  metrics.update({f"questions/{t}": types.count(t) for t in sorted(per_type)})
  metrics["images"] = len({q.image_id for q in questions})
  return Result(metrics, [{"question_id": q.question_id, "answer": a} for q, a in zip(questions, answers)])


def coco_captions(loaded, images: list[CaptionedImage], *, prompt: str = CAPTION_PROMPT, max_new_tokens: int = 30,
                  max_len: int | None = None, batch_size: int = 64, image_size: int | None = None,
                  meteor: bool = True) -> Result:
  """Greedy captions of `images` (`read_coco_captions`), scored against each image's references by
  `captioning.caption_metrics` (BLEU-1..4, ROUGE-L, CIDEr, and METEOR when `meteor` and java can run it),
  with the image count."""
  setup = _setup(loaded, image_size, batch_size)
  captions = _generate(setup, [c.image_path for c in images], [prompt] * len(images),
                       [f"image_id {c.image_id}" for c in images], max_new_tokens, max_len)
  metrics = {**captioning.caption_metrics(captions, [c.references for c in images], meteor=meteor), "images": len(images)}
  return Result(metrics, [{"image_id": c.image_id, "caption": t} for c, t in zip(images, captions)])


def multiple_choice(loaded, questions: list[ChoiceQuestion], *, prompt: str = QUESTION_PROMPT,
                    max_len: int | None = None, batch_size: int = 64, image_size: int | None = None) -> Result:
  """Each option of each question (`read_multiple_choice`) scored by its summed log-likelihood as the
  answer (module docstring), the best one chosen: {accuracy, questions}; per question its id, the chosen
  and the correct letter and every option's score."""
  setup = _setup(loaded, image_size, batch_size)
  prompts = [prompt.format(question=q.question, options=_options_text(q.options)) for q in questions]
  # One sequence per (question, option), in question order.
  owner = [i for i, q in enumerate(questions) for _ in q.options]
  options = [o for q in questions for o in q.options]
  _fit(setup, [([prompts[i]], [o]) for i, o in zip(owner, options)],
       [f"question {questions[i].id!r} option {o!r}" for i, o in zip(owner, options)], max_len)
  scores = []
  for start, images in _chunks(setup, [questions[i].image_path for i in owner]):
    episodes = [dict(image=image, prompts=[prompts[owner[start + k]]], answers=[options[start + k]])
                for k, image in enumerate(images)]
    scores.append(answer_log_likelihoods(setup.model, setup.params, setup.sequence, episodes,
                                                    batch_size=setup.batch_size))
  scores = np.concatenate(scores)
  predictions, first = [], 0
  for q in questions:
    option_scores = scores[first:first + len(q.options)]
    first += len(q.options)
    chosen = int(np.argmax(option_scores))
    predictions.append({"id": q.id, "prediction": LETTERS[chosen], "answer": LETTERS[q.answer],
                        "log_likelihoods": [float(s) for s in option_scores]})
  correct = sum(p["prediction"] == p["answer"] for p in predictions)
  return Result({"accuracy": correct / len(questions), "questions": len(questions)}, predictions)


def run(loaded, name: str, data: str, *, batch_size: int = 64, image_size: int | None = None,
        annotations: str | None = None, image_root: str | None = None, image_pattern: str | None = None,
        meteor: bool = True) -> Result:
  """Benchmark `name` (`BENCHMARKS`) on its files. vqav2: `data` the questions JSON, `annotations` the
  annotations JSON, images under `image_root` named by `image_pattern` (`read_vqav2`); coco_captions:
  `data` the captions JSON, images under `image_root` (default: its directory); multiple_choice: `data`
  the JSONL. Empty strings count as unset (a recipe's entries)."""
  image_root, image_pattern = image_root or None, image_pattern or None
  if name == "vqav2":
    if not (annotations and image_root):
      raise ConfigError("benchmark vqav2 needs annotations (the annotations JSON) and image_root")
    questions = readers.read_vqav2(data, annotations, image_root, image_pattern)
    return vqav2(loaded, questions, batch_size=batch_size, image_size=image_size)
  if name == "coco_captions":
    images = readers.read_coco_captions(data, image_root)
    return coco_captions(loaded, images, batch_size=batch_size, image_size=image_size, meteor=meteor)
  if name == "multiple_choice":
    return multiple_choice(loaded, readers.read_multiple_choice(data), batch_size=batch_size, image_size=image_size)
  raise ConfigError(f"benchmark={name!r}: expected one of {BENCHMARKS}")
