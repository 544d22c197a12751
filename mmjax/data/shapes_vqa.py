"""Questions, answers and captions about the procedural shapes scenes, for vision-language models.

Each record is one image with a task: a question and its one-word answer, or (with
probability `caption_fraction`) a caption to produce. The scenes, colours and held-out
combinations are those of `mmjax.data.shapes`, from their own random streams, and every
record is a pure function of (seed, stream, index). Question types:

  colour    "what colour is the circle?" -> "red"           (the circle is the only circle)
  shape     "what shape is the red object?" -> "circle"     (the only red object)
  count     "how many objects are there?" -> "two"
  relation  "is the square left of the triangle?" -> "yes" / "no"   (balanced)
"""
from __future__ import annotations

import hashlib
import json
import random

import numpy as np

from mmjax.data import shapes

QUESTION_TYPES = ("colour", "shape", "count", "relation")
CAPTION = "caption"
COUNT_WORDS = ("one", "two", "three")
# Every answer to a question, in a fixed order: class ids of VQA as classification.
ANSWERS = shapes.COLOUR_NAMES + shapes.SHAPES + COUNT_WORDS + ("yes", "no")
# Relation word -> which grid coordinate (0 row, 1 column) and sign make it true of a to b.
RELATIONS = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}
# Fixed-form prompts; models see them after the image and answer after them.
QUESTION_PROMPT = "question: {} answer:"
CAPTION_PROMPT = "caption:"
SCENE_PROMPT = "scene:"  # Before a description of the record's own scene (`described_fraction`).
_TRAIN, _EVAL, _SHOTS, _POOL = 10, 11, 12, 13  # Streams apart from those of mmjax.data.shapes.


def _relation_holds(a: shapes._Object, b: shapes._Object, relation: str) -> bool:
  axis, sign = RELATIONS[relation]
  pa, pb = divmod(a.cell, shapes.GRID)[axis], divmod(b.cell, shapes.GRID)[axis]
  return (pa - pb) * sign > 0


def _unique(objects, key):
  values = [key(o) for o in objects]
  return [o for o in objects if values.count(key(o)) == 1]


def question(rng: random.Random, objects: list[shapes._Object]) -> tuple[str, str, str]:
  """(question, answer, type) about a scene; the type is drawn among those the scene allows."""
  by_shape = _unique(objects, lambda o: o.shape)
  by_colour = _unique(objects, lambda o: o.colour)
  types = ["count"] + ["colour"] * bool(by_shape) + ["shape"] * bool(by_colour)
  types += ["relation"] * (len(by_shape) >= 2)
  kind = rng.choice(types)
  if kind == "count":
    return "how many objects are there?", COUNT_WORDS[len(objects) - 1], kind
  if kind == "colour":
    o = rng.choice(by_shape)
    return f"what colour is the {shapes.SHAPES[o.shape]}?", shapes.COLOUR_NAMES[o.colour], kind
  if kind == "shape":
    o = rng.choice(by_colour)
    return f"what shape is the {shapes.COLOUR_NAMES[o.colour]} object?", shapes.SHAPES[o.shape], kind
  a, b = rng.sample(by_shape, 2)
  want_yes = rng.random() < 0.5
  # Distinct cells make some relation true and its opposite false, so both answers are always possible.
  relation = rng.choice([r for r in RELATIONS if _relation_holds(a, b, r) == want_yes])
  text = f"is the {shapes.SHAPES[a.shape]} {relation} the {shapes.SHAPES[b.shape]}?"
  return text, "yes" if want_yes else "no", kind


def _record(rng: random.Random, combos, image_size: int, caption_fraction: float,
            described_fraction: float = 0.0) -> dict:
  objects = shapes._scene(rng, combos, shapes._object_count(rng))
  image = shapes._render(rng, objects, image_size)
  if rng.random() < caption_fraction:
    record = dict(image=image, prompt=CAPTION_PROMPT, answer=shapes._caption(rng, objects), kind=CAPTION)
  else:
    text, answer, kind = question(rng, objects)
    record = dict(image=image, prompt=QUESTION_PROMPT.format(text), answer=answer, kind=kind)
  if described_fraction and rng.random() < described_fraction:  # No draw when 0: the plain streams stay.
    record["prompt"] = f"{SCENE_PROMPT} {shapes._caption(rng, objects)} {record['prompt']}"
  return record


def episode(records: list[dict]) -> dict:
  """Records -> one sequence's worth: dict(image=uint8 [M, S, S, 3], prompts, answers, kinds)."""
  return dict(image=np.stack([r["image"] for r in records]), prompts=[r["prompt"] for r in records],
              answers=[r["answer"] for r in records], kinds=[r["kind"] for r in records])


class ShapesVQASource:
  """Grain random-access source of episodes (see `episode`) of `media_per_record` images each;
  `record(i)` is one image with its task, dict(image=uint8 [S, S, 3], prompt, answer, kind).
  With `described_fraction`, that share of the records come after a description of their own
  scene ("scene: a red circle question: what colour is the circle? answer:", "scene: a red
  circle caption:" -> "a photo of a small red circle"): text from which a language model
  without images learns to answer and caption from what precedes the prompt, as large language
  models learn from documents; a frozen one can then read images placed there."""

  def __init__(self, seed: int = 0, image_size: int = 64, held_out_fraction: float = 0.2,
               num_records: int = 1_000_000, caption_fraction: float = 0.25, stream: int = _TRAIN,
               media_per_record: int = 1, described_fraction: float = 0.0):
    self.seed, self.image_size, self.num_records = seed, image_size, num_records
    self.held_out_fraction, self.caption_fraction, self.stream = held_out_fraction, caption_fraction, stream
    self.media_per_record, self.described_fraction = media_per_record, described_fraction
    self._combos = shapes._seen_combos(seed, held_out_fraction)

  def __len__(self) -> int:
    return self.num_records

  def record(self, index: int) -> dict:
    return _record(shapes._rng(self.seed, self.stream, index), self._combos, self.image_size, self.caption_fraction,
                   self.described_fraction)

  def __getitem__(self, index: int) -> dict:
    m = self.media_per_record
    return episode([self.record(index * m + j) for j in range(m)])

  def __repr__(self) -> str:  # Grain validates restored iterator state against it.
    return (f"ShapesVQASource(seed={self.seed}, image_size={self.image_size}, "
            f"held_out_fraction={self.held_out_fraction}, num_records={self.num_records}, "
            f"caption_fraction={self.caption_fraction}, stream={self.stream}, "
            f"media_per_record={self.media_per_record}"
            + (f", described_fraction={self.described_fraction})" if self.described_fraction else ")"))


class RetrievalAugmentedSource(ShapesVQASource):
  """`ShapesVQASource` whose record i carries `contexts[i]`, captions retrieved for its image, in
  its prompt (`with_context`); it has `len(contexts) // media_per_record` episodes."""

  def __init__(self, contexts: list[list[str]], seed: int = 0, image_size: int = 64, held_out_fraction: float = 0.2,
               caption_fraction: float = 0.25, media_per_record: int = 1, described_fraction: float = 0.0):
    super().__init__(seed, image_size, held_out_fraction, len(contexts) // media_per_record, caption_fraction,
                     media_per_record=media_per_record, described_fraction=described_fraction)
    self.contexts = contexts
    self._digest = hashlib.sha1(json.dumps(contexts).encode()).hexdigest()[:12]

  def record(self, index: int) -> dict:
    return with_context(super().record(index), self.contexts[index])

  def __repr__(self) -> str:  # Names the retrieved contexts too: another retriever gives other episodes.
    return f"{super().__repr__()[:-1]}, contexts={len(self.contexts)}@{self._digest})"


def with_context(record: dict, captions: list[str]) -> dict:
  """The record with retrieved captions before its prompt, each as a solved caption prompt
  ("caption: a red circle caption: ... question: ... answer:"): retrieval-augmented generation."""
  context = "".join(f"{CAPTION_PROMPT} {c} " for c in captions)
  return dict(record, prompt=context + record["prompt"])


def caption_pool(seed: int = 0, n: int = 8192, held_out_fraction: float = 0.2) -> list[str]:
  """The distinct captions of `n` training scenes from their own stream: the text a retriever
  searches for retrieval-augmented generation (held-out combinations never appear in it)."""
  source = ShapesVQASource(seed, 8, held_out_fraction, n, caption_fraction=1.0, stream=_POOL)
  return list(dict.fromkeys(source.record(i)["answer"] for i in range(n)))


def labelled(record: dict) -> dict:
  """A question record as a classification example: dict(image, caption=its prompt, label=answer id,
  kind=question type id)."""
  return dict(image=record["image"], caption=record["prompt"], label=np.int32(ANSWERS.index(record["answer"])),
              kind=np.int32(QUESTION_TYPES.index(record["kind"])))


class ShapesVQALabelSource(ShapesVQASource):
  """The training questions of `ShapesVQASource` (no captions), one per record, as `labelled` examples."""

  def __init__(self, seed: int = 0, image_size: int = 64, held_out_fraction: float = 0.2):
    super().__init__(seed, image_size, held_out_fraction, caption_fraction=0.0)

  def __getitem__(self, index: int) -> dict:
    return labelled(self.record(index))

  def __repr__(self) -> str:
    return f"ShapesVQALabelSource(seed={self.seed}, image_size={self.image_size}, " \
           f"held_out_fraction={self.held_out_fraction})"


def eval_set(seed: int = 0, image_size: int = 64, n: int = 256, held_out_fraction: float = 0.2,
             caption_fraction: float = 0.0, described_fraction: float = 0.0) -> list[dict]:
  """`n` records from the evaluation stream (never seen in training)."""
  source = ShapesVQASource(seed, image_size, held_out_fraction, n, caption_fraction, stream=_EVAL,
                           described_fraction=described_fraction)
  return [source.record(i) for i in range(n)]


def few_shot_set(seed: int = 0, image_size: int = 64, n: int = 128, shots: int = 4,
                 held_out_fraction: float = 0.2, train_queries: bool = False) -> list[list[dict]]:
  """`n` question episodes for in-context evaluation: `shots` solved demonstrations (from their
  own stream) followed by the query record of `eval_set` (so 0 shots is `eval_set`), or with
  `train_queries` a question of the training stream (to fit in-context vectors on)."""
  demos = ShapesVQASource(seed, image_size, held_out_fraction, n * max(shots, 1), 0.0, stream=_SHOTS)
  if train_queries:
    source = ShapesVQASource(seed, image_size, held_out_fraction, n, 0.0, stream=_TRAIN)
    queries = [source.record(i) for i in range(n)]
  else:
    queries = eval_set(seed, image_size, n, held_out_fraction)
  return [[demos.record(i * shots + j) for j in range(shots)] + [q] for i, q in enumerate(queries)]


def retrieved_few_shot_set(select, seed: int = 0, image_size: int = 64, n: int = 128, shots: int = 4,
                           pool: int = 1024, held_out_fraction: float = 0.2) -> list[list[dict]]:
  """`few_shot_set` with retrieved demonstrations (RICES): each query of `eval_set` gets the `shots`
  records of a `pool` of solved questions (the demonstration stream) whose images
  `select(query_images, pool_images, shots) -> [n, shots] indices, best first` ranks highest,
  ordered so the best one comes last, next to the query."""
  source = ShapesVQASource(seed, image_size, held_out_fraction, pool, 0.0, stream=_SHOTS)
  demos = [source.record(i) for i in range(pool)]
  queries = eval_set(seed, image_size, n, held_out_fraction)
  chosen = select(np.stack([q["image"] for q in queries]), np.stack([d["image"] for d in demos]), shots)
  return [[demos[j] for j in reversed(row)] + [q] for row, q in zip(chosen, queries)]

def corpus(num_texts: int, seed: int = 0) -> list[str]:
  """Prompts with their answers, for tokenizer and language-model training (all combinations)."""
  source = ShapesVQASource(seed=seed, held_out_fraction=0.0, caption_fraction=0.25)
  return [f"{r['prompt']} {r['answer']}" for r in map(source.record, range(num_texts))]

