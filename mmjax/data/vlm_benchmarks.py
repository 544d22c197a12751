"""Vision-language benchmark files in the formats they are published in, read into plain records.

  VQAv2      the official question and annotation JSON pair (`v2_OpenEnded_mscoco_val2014_questions.json`,
             `v2_mscoco_val2014_annotations.json`), images under an image root named as COCO names them
  COCO       a captions annotation JSON (`captions_val2014.json`): every image with its reference captions
  choices    MMMU-style multiple choice JSONL: one question with its options and answer a line

Every reader checks that each image file exists before anything runs, and raises DataError naming
the file and the key or line at fault.
"""
from __future__ import annotations

import ast
import json
import os
import string
from typing import NamedTuple

from mmjax.errors import DataError

# VQAv2's image names: the questions file's `data_subtype` ("val2014") fills `split`.
VQAV2_IMAGE_PATTERN = "COCO_{split}_{image_id:012d}.jpg"
LETTERS = string.ascii_uppercase


class VQAQuestion(NamedTuple):
  question_id: int
  image_id: int
  image_path: str
  question: str
  answers: list[str]  # The human answers (10 in VQAv2), as written.
  answer_type: str  # "yes/no", "number" or "other" in VQAv2.
  question_type: str | None  # "what color is the", ... (VQAv2's 65 question prefixes), when given.


class CaptionedImage(NamedTuple):
  image_id: int
  image_path: str
  references: list[str]


class ChoiceQuestion(NamedTuple):
  id: str
  image_path: str
  question: str
  options: list[str]
  answer: int  # Index into options.


def _load_json(path: str, key: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e})") from e
  except ValueError as e:
    raise DataError(f"{path}: not JSON ({e})") from e
  if not isinstance(data, dict) or not isinstance(data.get(key), list):
    raise DataError(f"{path}: expected an object with a {key!r} list")
  return data


def _field(path: str, where: str, record, key: str, kind: type):
  """`record[key]`, checked to be a `kind`; DataError naming the file, the record and the key."""
  if not isinstance(record, dict) or key not in record:
    raise DataError(f"{path}: {where} lacks {key!r}")
  value = record[key]
  if not isinstance(value, kind) or isinstance(value, bool):
    raise DataError(f"{path}: {where} has {key}={value!r}; expected {kind.__name__}")
  return value


def _check_images_exist(paths, what: str) -> None:
  missing = [p for p in dict.fromkeys(paths) if not os.path.isfile(p)]
  if missing:
    raise DataError(f"{what}: image file {missing[0]} not found ({len(missing)} of {len(set(paths))} missing)")


def read_vqav2(questions_path: str, annotations_path: str, image_root: str,
               image_pattern: str | None = None) -> list[VQAQuestion]:
  """The questions of an official VQAv2 pair with their human answers, in the questions file's order.

  Image i is `image_root/image_pattern.format(image_id=i, split=<data_subtype>)`; the pattern defaults to
  `VQAV2_IMAGE_PATTERN` ("COCO_val2014_000000000042.jpg", with the questions file's `data_subtype`), and
  may hold directories ("{split}/COCO_{split}_{image_id:012d}.jpg") or drop `split` ("{image_id}.png").
  Every question needs an annotation (same `question_id`) with `answers` and `answer_type`."""
  questions = _load_json(questions_path, "questions")
  annotations = _load_json(annotations_path, "annotations")
  split = questions.get("data_subtype")
  pattern = image_pattern or VQAV2_IMAGE_PATTERN
  if "{split" in pattern and not isinstance(split, str):
    raise DataError(f"{questions_path}: no 'data_subtype' (e.g. \"val2014\") to name the images by; "
                    "give an image pattern without {split}")
  by_id = {}
  for n, a in enumerate(annotations["annotations"]):
    by_id[_field(annotations_path, f"annotations[{n}]", a, "question_id", int)] = n, a
  out = []
  for n, q in enumerate(questions["questions"]):
    where = f"questions[{n}]"
    qid = _field(questions_path, where, q, "question_id", int)
    image_id = _field(questions_path, where, q, "image_id", int)
    text = _field(questions_path, where, q, "question", str)
    if qid not in by_id:
      raise DataError(f"{annotations_path}: no annotation for question_id {qid} ({questions_path} {where})")
    m, a = by_id[qid]
    where = f"annotations[{m}] (question_id {qid})"
    answers = [_field(annotations_path, f"{where} answers[{k}]", h, "answer", str)
               for k, h in enumerate(_field(annotations_path, where, a, "answers", list))]
    if not answers:
      raise DataError(f"{annotations_path}: {where} has no answers")
    question_type = a.get("question_type")
    try:
      name = pattern.format(image_id=image_id, split=split)
    except (KeyError, IndexError, ValueError) as e:
      raise DataError(f"image pattern {pattern!r}: fields are {{image_id}} and {{split}} ({e!r})") from e
    out.append(VQAQuestion(qid, image_id, os.path.join(image_root, name), text, answers,
                           _field(annotations_path, where, a, "answer_type", str),
                           question_type if isinstance(question_type, str) else None))
  if not out:
    raise DataError(f"{questions_path}: no questions")
  _check_images_exist([q.image_path for q in out], questions_path)
  return out


def read_coco_captions(path: str, image_root: str | None = None) -> list[CaptionedImage]:
  """The images of a COCO captions file (`images`: id, file_name; `annotations`: image_id, caption), in
  the file's order, each with its stripped captions; files are `image_root/file_name` (`image_root`
  defaults to the file's directory). Every image needs a caption and every caption a listed image."""
  data = _load_json(path, "images")
  if not isinstance(data.get("annotations"), list):
    raise DataError(f"{path}: expected an 'annotations' list beside 'images'")
  root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
  files = {}
  for n, image in enumerate(data["images"]):
    image_id = _field(path, f"images[{n}]", image, "id", int)
    files[image_id] = _field(path, f"images[{n}]", image, "file_name", str)
  captions = {i: [] for i in files}
  for n, a in enumerate(data["annotations"]):
    image_id = _field(path, f"annotations[{n}]", a, "image_id", int)
    if image_id not in captions:
      raise DataError(f"{path}: annotations[{n}] has image_id {image_id}, which 'images' does not list")
    caption = _field(path, f"annotations[{n}]", a, "caption", str).strip()
    if caption:
      captions[image_id].append(caption)
  empty = [i for i, c in captions.items() if not c]
  if empty:
    raise DataError(f"{path}: image_id {empty[0]} has no caption ({len(empty)} images without one)")
  if not files:
    raise DataError(f"{path}: no images")
  out = [CaptionedImage(i, os.path.join(root, name), captions[i]) for i, name in files.items()]
  _check_images_exist([c.image_path for c in out], path)
  return out


def _options(value, where: str) -> list[str]:
  # MMMU's own release stores the list as its Python repr ("['1', '2']").
  if isinstance(value, str):
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
  if not isinstance(value, list) or len(value) < 2 or not all(isinstance(o, str) for o in value):
    raise DataError(f"{where}: 'options' must be a list of at least 2 strings, got {value!r}")
  if len(value) > len(LETTERS):
    raise DataError(f"{where}: {len(value)} options; at most {len(LETTERS)} (A-Z)")
  return value


def _answer_index(value, options: list[str], where: str) -> int:
  """A letter "A".. or a 0-based index, checked against the options."""
  if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
    index = LETTERS.index(value.strip().upper())
  elif isinstance(value, int) and not isinstance(value, bool):
    index = value
  else:
    raise DataError(f"{where}: 'answer' must be a letter (A, B, ...) or a 0-based option index, got {value!r}")
  if not 0 <= index < len(options):
    raise DataError(f"{where}: answer {value!r} names no option; there are {len(options)} "
                    f"(A-{LETTERS[len(options) - 1]}, or 0-{len(options) - 1})")
  return index


def read_multiple_choice(path: str) -> list[ChoiceQuestion]:
  """Multiple-choice questions, one JSON object a line (blank lines skipped): `image` (a path relative to
  the file's directory, or absolute), `question`, `options` (a list of strings), `answer` (the correct
  option as a letter "A", "B", ... or a 0-based index) and an optional `id` (default: the line number)."""
  root = os.path.dirname(os.path.abspath(path))
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e})") from e
  out = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path} line {number}"
    try:
      record = json.loads(line)
    except ValueError as e:
      raise DataError(f"{where}: not a JSON object ({e})") from e
    if not isinstance(record, dict):
      raise DataError(f"{where}: not a JSON object")
    missing = [k for k in ("image", "question", "options", "answer") if k not in record]
    if missing:
      raise DataError(f"{where}: missing {missing}")
    if not isinstance(record["image"], str) or not isinstance(record["question"], str):
      raise DataError(f"{where}: 'image' and 'question' must be strings")
    options = _options(record["options"], where)
    out.append(ChoiceQuestion(str(record.get("id", number)), os.path.join(root, record["image"]), record["question"],
                              options, _answer_index(record["answer"], options, where)))
  if not out:
    raise DataError(f"{path}: no questions")
  _check_images_exist([q.image_path for q in out], path)
  return out
