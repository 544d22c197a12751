"""Generative training end to end: a text-only LM, then LLaVA starting its `lm` from that run."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

import mmjax
from mmjax import export, losses, runs
from mmjax import train as train_lib
from mmjax.data import shapes_vqa
from mmjax.evals import vqa
from mmjax.generate import answer, make_sequence
from mmjax.errors import ConfigError
from mmjax.evaluate import benchmark
from tests.helpers import logged_losses, run_notebook, tiny_generative_recipe

TINY_LM = dict(width=32, depth=1, num_heads=2, mlp_dim=64)


def test_next_token_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits, targets = rng.normal(size=(2, 5, 7)), rng.integers(0, 7, (2, 5))
  weights = (rng.random((2, 5)) < 0.6).astype(np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  want = (nll * weights).sum() / weights.sum()
  got = losses.next_token_loss(np.float32(logits), targets, weights)
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
  """200 steps (a few seconds): enough to learn each question type's answers, which 4 steps are not."""
  workdir = str(tmp_path_factory.mktemp("lm"))
  overrides = {f"model.{k}": v for k, v in TINY_LM.items()}
  overrides.update({"total_steps": 200, "log_every": 20, "eval_every": 200, "checkpoint_every": 200,
                    "evals.vqa.n": 128})
  config = tiny_generative_recipe("lm_shapes", **overrides)
  return workdir, train_lib.train(config, workdir)


def test_lm_trains_and_reports_vqa_against_the_majority_baseline(lm_run):
  workdir, summary = lm_run
  losses = logged_losses(workdir)
  assert losses[-1] <= 0.5 * losses[0], losses  # Measured 3.5 at step 20, 0.7 at step 200.
  # Without images the LM can only learn each question type's likely answers: measured 39 of 128 against the
  # majority answer's 24 (an untrained LM: 0).
  assert summary["vqa/accuracy"] >= 1.3 * summary["vqa/majority_baseline"] > 0, summary
  assert {"vqa/count", "vqa/colour", "vqa/shape", "described_vqa/accuracy", "described_vqa/colour"} <= set(summary)


@pytest.fixture(scope="module")
def llava_run(lm_run, tmp_path_factory):
  lm_dir, _ = lm_run
  workdir = str(tmp_path_factory.mktemp("llava"))
  overrides = {f"model.lm.{k}": v for k, v in TINY_LM.items()}
  overrides.update({"model.vision.width": 32, "model.vision.depth": 1, "model.vision.mlp_dim": 64,
                    "model.vision.num_heads": 2, "evals.captioning.n": 16, "init_from": (("lm", lm_dir),),
                    "optim.frozen": (r"^lm/",), "evals.scenes": dict(benchmark="multiple_choice", data=_scene_questions(
                        tmp_path_factory.mktemp("mc"))), "evals.unset": dict(benchmark="vqav2", data="")})
  config = tiny_generative_recipe("llava_shapes", **overrides)
  return workdir, config, train_lib.train(config, workdir)


def _scene_questions(directory) -> str:
  """An MMMU-style JSONL of 8 shapes scenes, each asked its colour or shape among four options."""
  records, lines = shapes_vqa.eval_set(seed=3, image_size=40, n=64), []
  for record in records:
    if record["kind"] not in ("colour", "shape") or len(lines) == 8:
      continue
    options = sorted({r["answer"] for r in records if r["kind"] == record["kind"]})[:3]
    options = sorted(set(options) | {record["answer"]})
    Image.fromarray(record["image"]).save(directory / f"{len(lines)}.png")
    lines.append(json.dumps({"image": f"{len(lines)}.png", "question": record["prompt"].split("question: ")[-1]
                             .removesuffix(" answer:"), "options": options, "answer": options.index(record["answer"])}))
  (directory / "scenes.jsonl").write_text("\n".join(lines) + "\n")
  return str(directory / "scenes.jsonl")


def test_a_recipes_multiple_choice_entry_runs_in_training_as_the_command_scores_it(llava_run):
  """The wiring of VLM benchmark entries into training; the scores themselves are checked against a
  float64 forward pass in tests/test_vlm_benchmarks.py."""
  workdir, config, summary = llava_run
  result = benchmark("multiple_choice", config.evals.scenes.data, workdir=workdir, batch_size=16)
  assert result["model"].endswith("@4") and result["metrics"]["questions"] == summary["scenes/questions"] == 8
  assert summary["scenes/accuracy"] == result["metrics"]["accuracy"]
  assert not any(k.startswith("unset/") for k in summary)


def test_llava_starts_from_the_lm_run_and_trains_with_evals(lm_run, llava_run):
  lm_dir, _ = lm_run
  workdir, config, summary = llava_run
  assert {"vqa/accuracy", "vqa/majority_baseline", "captioning/bleu4", "captioning/cider"} <= set(summary)
  # The LM was frozen, so after training it still holds exactly the parameters of the LM run.
  lm_params = jax.device_get(runs.restore_params(runs.load_run_config(lm_dir), lm_dir)[2])
  trained = jax.device_get(runs.restore_params(config, workdir)[2])["lm"]
  jax.tree.map(np.testing.assert_array_equal, trained, lm_params)


def test_exported_vlm_answers_like_the_run_and_drives_the_notebook(llava_run, tmp_path):
  workdir, config, summary = llava_run
  out = export.export(workdir, str(tmp_path / "export"))
  model, params, tokenizer = mmjax.load(out)
  records = shapes_vqa.eval_set(seed=0, image_size=config.data.image_size, n=config.evals.vqa.n)
  sequence = make_sequence(model, tokenizer, config.data.max_len)
  predictions = answer(model, params, sequence, [shapes_vqa.episode([r]) for r in records],
                                  max_new_tokens=config.evals.vqa.max_new_tokens, batch_size=16)
  assert vqa.exact_match(predictions, [r["answer"] for r in records]) == pytest.approx(summary["vqa/accuracy"])
  printed, images = run_notebook("vlm_demo.ipynb", tmp_path, MMJAX_EXPORT=out)
  assert "LLaVA: 32 px images" in printed and "exact match" in printed
  assert images == 2  # The question grid and the captions.


def test_init_from_names_a_mismatched_subtree(lm_run):
  lm_dir, _ = lm_run
  params = {"lm": {"embedder": {"embedding": np.zeros((3, 3), np.float32)}}}
  with pytest.raises(ConfigError, match="parameters differ"):
    runs.initial_params(params, "lm", lm_dir)
  with pytest.raises(ConfigError, match="no parameters 'vision'"):
    runs.initial_params(params, "vision", lm_dir)
