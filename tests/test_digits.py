"""The README's digits walk-through, command for command, from a directory outside the repository:
a real dataset nobody here made (scikit-learn's UCI handwritten digits) as captioned files, a
tokenizer trained on its captions, the CLIP recipe trained briefly through the folder source, an
export, zero-shot classification of the held-out digits, and a linear probe on the run's checkpoint."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("sklearn")

from mmjax.evals import zeroshot  # noqa: E402
from tests.helpers import run_module  # noqa: E402

STEPS = 200


def test_digits_walk_through_classifies_held_out_digits_zero_shot(tmp_path):
  out = run_module("mmjax.data.digits", "--out", "digits", cwd=tmp_path)
  assert "1258 captioned training images and 539 test images in 10 class folders" in out
  run_module("mmjax.data.tokenizer", "train", "--source", "captions", "--captions", "digits/train/captions.jsonl",
       "--out", "digits/spm.model", "--vocab_size", "64", cwd=tmp_path)
  run_module("mmjax.train", "--config", "clip_shapes", "--workdir", "run", "--config.data.source=folder",
       "--config.data.captions=digits/train/captions.jsonl", "--config.data.tokenizer=digits/spm.model",
       "--config.data.image_size=32", "--config.data.batch_size=64", f"--config.total_steps={STEPS}",
       "--config.eval_every=0", cwd=tmp_path)
  run_module("mmjax.export", "--workdir", "run", "--out", "export", cwd=tmp_path)
  printed = run_module("mmjax.evaluate", "--export", "export", "--benchmark", "zeroshot_classification", "--data",
                 "digits/test", "--template", "a photo of the digit {}.", "--out", "zeroshot.json", cwd=tmp_path)
  assert "acc1" in printed and "mean_per_class_recall" in printed
  with open(tmp_path / "zeroshot.json") as f:
    result = json.load(f)
  assert result["task"] == "zeroshot_classification" and result["dataset"].endswith(os.path.join("digits", "test"))
  metrics = result["metrics"]
  assert metrics["images"] == 539 and metrics["classes"] == 10 and metrics["skipped"] == 0
  # Chance is 0.1; 300 steps measured 0.957 (seed 0).
  assert metrics["acc1"] >= 0.6 and metrics["mean_per_class_recall"] >= 0.6, metrics
  # A linear probe on the run's own checkpoint: both splits are class folders. 300 steps measured 0.948.
  run_module("mmjax.evaluate", "--workdir", "run", "--benchmark", "linear_probe", "--data", "digits/train",
             "--test_data", "digits/test", "--out", "probe.json", cwd=tmp_path)
  with open(tmp_path / "probe.json") as f:
    probe = json.load(f)
  assert probe["model"].startswith(str(tmp_path / "run")) and probe["model"].endswith(f"@{STEPS}")
  assert probe["metrics"]["train_images"] == 1258 and probe["metrics"]["test_images"] == 539
  assert probe["metrics"]["acc1"] >= 0.6, probe["metrics"]


def test_classification_metrics_match_their_definitions():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(200, 7))
  labels = rng.integers(0, 7, 200)
  labels[:3] = 6  # Unbalanced classes, so mean per-class recall differs from accuracy.
  got = zeroshot.classification_metrics(scores, labels)
  ranks = np.array([(scores[i] > scores[i, labels[i]]).sum() for i in range(200)])  # 0 = top-1.
  per_class = [np.mean(ranks[labels == c] == 0) for c in range(7)]
  assert got["acc1"] == pytest.approx(np.mean(ranks == 0))
  assert got["acc5"] == pytest.approx(np.mean(ranks < 5))
  assert got["mean_per_class_recall"] == pytest.approx(np.mean(per_class))
  assert got["mean_per_class_recall"] != pytest.approx(got["acc1"])
