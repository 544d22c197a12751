"""The trainer end to end on a tiny model: checkpoints, exact resume, NaN stop, evaluate, export."""
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import mmjax
from mmjax import parallel, runs, tasks, train as train_lib
from mmjax.data import shapes
from mmjax.checkpoint import Checkpointer
from mmjax.errors import CheckpointError, NonFiniteLossError
from mmjax.evaluate import benchmark, evaluate
from mmjax.export import export
from tests.helpers import logged_losses, run_notebook, tiny_config
from tests.test_losses import ref_infonce, ref_triplet

def _config(**overrides):
  return tiny_config(**{"total_steps": 6, "checkpoint_every": 2, "log_every": 2, "eval_every": 6, **overrides})


def _params(workdir):
  return jax.device_get(runs.restore_params(runs.load_run_config(workdir), workdir)[2])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  summary = train_lib.train(_config(), workdir)
  return workdir, summary


def test_run_writes_checkpoints_metrics_and_summary(finished_run, capsys):
  workdir, summary = finished_run
  assert Checkpointer(workdir, keep=3).latest_step() == 6
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["2", "4", "6"]
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert steps[:3] == [2, 4, 6]
  # In 6 steps the sigmoid loss sheds its initial bias of -10 (measured 8.9 at step 2, 3.9 at step 6); the
  # evals stay at chance this early (zero-shot beating chance is tested on a longer run: test_prompts.py).
  losses = logged_losses(workdir)
  assert losses[-1] <= 0.6 * losses[0], losses
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert {"zeroshot/acc_seen", "zeroshot/acc_held_out", "retrieval/i2t_r1", "retrieval/t2i_r5",
          "binding/acc"} <= set(summary)
  assert summary["checkpoint"].endswith(os.path.join("checkpoints", "6"))
  # Running the finished run again reports it instead of training.
  again = train_lib.train(_config(), workdir)
  assert again == summary
  assert "run complete" in capsys.readouterr().out


def test_the_same_seed_on_the_same_machine_gives_identical_metrics(finished_run, tmp_path):
  workdir, summary = finished_run
  again = train_lib.train(_config(), str(tmp_path))
  timing = {"samples_per_s", "steps_per_s", "train_seconds", "checkpoint"}

  def logged(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
      return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in f]

  assert logged(str(tmp_path)) == logged(workdir)
  assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in summary.items() if k not in timing}
  # A different seed is a different run, so the comparison above can fail.
  other = train_lib.train(_config(seed=1), str(tmp_path / "seed1"))
  assert other["zeroshot/acc"] != summary["zeroshot/acc"] or logged(str(tmp_path / "seed1")) != logged(workdir)


def test_killed_run_resumes_to_the_same_parameters(finished_run, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  workdir = "run"  # Relative, as `make train` passes it.
  real_global_batch = parallel.global_batch
  calls = []

  def dies_at_step_5(batch, mesh):
    calls.append(1)
    if len(calls) == 5:
      raise KeyboardInterrupt("killed")
    return real_global_batch(batch, mesh)

  monkeypatch.setattr(parallel, "global_batch", dies_at_step_5)
  with pytest.raises(KeyboardInterrupt):
    train_lib.train(_config(eval_every=0), workdir)
  monkeypatch.setattr(parallel, "global_batch", real_global_batch)
  saved = Checkpointer(workdir, keep=3)
  assert saved.latest_step() == 4
  first_segment = saved.train_seconds(4)  # Steps 1-4, compilation included.
  start = time.perf_counter()
  summary = train_lib.train(_config(eval_every=0), workdir)  # Resumes at step 4 with the data iterator's state.
  second_segment = time.perf_counter() - start
  want, got = _params(finished_run[0]), _params(workdir)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
  # The summary's training time covers both segments, not the resumed one alone.
  assert first_segment > 0 and first_segment <= summary["train_seconds"] <= first_segment + second_segment + 0.1


@pytest.mark.parametrize("loss, reference", [
    (dict(kind="infonce", num_negatives=4), lambda x, y, aux: ref_infonce(x, y, aux["t"], 4)),
    (dict(kind="triplet", num_negatives=3, margin=0.4, hardest=True),
     lambda x, y, aux: ref_triplet(x, y, 0.4, 3, hardest=True))], ids=["infonce", "triplet"])
def test_contrastive_task_computes_the_configured_infonce_or_triplet_loss(loss, reference):
  config = _config()
  config.loss.update(loss)
  mesh = parallel.make_mesh(config.mesh, devices=jax.devices()[:2])
  task = tasks.get(config.task)(config, mesh)
  rng = np.random.default_rng(0)
  size, batch_size = config.data.image_size, config.data.batch_size
  batch = {"image": rng.uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32),
           "text": rng.integers(3, 40, (batch_size, task.max_len)).astype(np.int32)}
  params = nn.unbox(task.init(jax.random.key(0), batch))
  value, _ = task.loss_fn(params, batch, jax.random.key(1), train=False)
  zimg, ztxt, aux = task.model.apply({"params": params}, image=batch["image"], text=batch["text"])
  want = reference(np.asarray(zimg, np.float64), np.asarray(ztxt, np.float64), {"t": float(np.ravel(aux["t"])[0])})[0]
  np.testing.assert_allclose(value, want, rtol=1e-5)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  real_global_batch = parallel.global_batch
  calls = []

  def nan_images_at_step_3(batch, mesh):
    calls.append(1)
    if len(calls) == 3:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    return real_global_batch(batch, mesh)

  monkeypatch.setattr(parallel, "global_batch", nan_images_at_step_3)
  with pytest.raises(NonFiniteLossError, match=r"at step 3.*Last good checkpoint: step 2"):
    train_lib.train(_config(eval_every=0), str(tmp_path))
  assert Checkpointer(str(tmp_path), keep=3).latest_step() == 2
  params = _params(str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@jax.custom_vjp
def _zero_with_inf_gradient(x, trigger):
  """0 in the forward pass; an Inf gradient for `x` where `trigger` is set."""
  return 0.0 * x.sum()


_zero_with_inf_gradient.defvjp(lambda x, trigger: (0.0 * x.sum(), (x, trigger)),
                               lambda res, g: (jnp.where(res[1], jnp.inf, 0.0) * jnp.ones_like(res[0]), None))


def test_an_inf_gradient_with_a_finite_loss_is_never_saved(tmp_path, monkeypatch):
  # Step 4 (a save step, the last) gets a finite loss and an Inf gradient, so Adam's update turns
  # every parameter it touches into NaN: the old loss-only check saved those parameters.
  real_loss_fn, real_global_batch, calls = tasks.ContrastiveTask.loss_fn, parallel.global_batch, []

  def loss_fn(self, params, batch, rng, train=True):
    loss, metrics = real_loss_fn(self, params, batch, rng, train)
    trigger = batch["image"][0, 0, 0, 0] == 1234.0
    return loss + _zero_with_inf_gradient(params["img"]["embedding"]["kernel"], trigger), metrics

  def mark_step_4(batch, mesh):
    calls.append(1)
    if len(calls) == 4:
      image = batch["image"].copy()
      image[0, 0, 0, 0] = 1234.0
      batch = dict(batch, image=image)
    return real_global_batch(batch, mesh)

  monkeypatch.setattr(tasks.ContrastiveTask, "loss_fn", loss_fn)
  monkeypatch.setattr(parallel, "global_batch", mark_step_4)
  with pytest.raises(NonFiniteLossError, match=r"gradient norm is inf \(the loss, [0-9.]+, is finite\) at step 4.*"
                                               r"Last good checkpoint: step 2"):
    train_lib.train(_config(total_steps=4, eval_every=0), str(tmp_path))
  assert Checkpointer(str(tmp_path), keep=3).latest_step() == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(str(tmp_path))))


def test_evaluate_and_export_load(finished_run, tmp_path):
  workdir, summary = finished_run
  results = evaluate(runs.load_run_config(workdir), workdir)
  assert results["step"] == 6
  assert results["zeroshot/acc_seen"] == pytest.approx(summary["zeroshot/acc_seen"])

  out = export(workdir, str(tmp_path / "export"))
  model, params, tokenizer = mmjax.load(out)
  want = _params(workdir)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, want)
  text = tokenizer.encode(["a red circle"], 16)
  ztxt = model.apply({"params": params}, text=text)[1]
  assert ztxt.shape == (1, 32)
  with pytest.raises(CheckpointError, match="not an mmjax export"):
    mmjax.load(str(tmp_path))


def test_zero_shot_notebook_runs_on_an_export_for_shapes_and_for_a_folder_of_your_classes(finished_run, tmp_path):
  out = export(finished_run[0], str(tmp_path / "export"))
  demo = shapes.zeroshot_set(seed=0, image_size=40, per_class=2)  # Another size than the model's.
  for index, (image, label) in enumerate(zip(demo["images"], demo["labels"])):
    if label < 3:  # Three classes, under other names.
      os.makedirs(tmp_path / "mine" / f"class{label}", exist_ok=True)
      Image.fromarray(image).save(tmp_path / "mine" / f"class{label}" / f"{index}.png")
  text, images = run_notebook("zero_shot.ipynb", tmp_path, MMJAX_EXPORT=out)
  assert "on CPU" in text and "the shapes demo: 48" in text and "accuracy (chance 0.021)" in text
  assert images == 2  # The grid and the heatmap.
  text, images = run_notebook("zero_shot.ipynb", tmp_path, MMJAX_EXPORT=out, MMJAX_IMAGE_FOLDER=str(tmp_path / "mine"),
                              MMJAX_CLASSES=",".join(demo["class_names"][:3]))
  assert "your data: 6 images of 3 classes" in text and "accuracy (chance 0.333)" in text and images == 2


def test_benchmark_notebook_scores_folder_and_karpathy_files_as_the_command_does(finished_run, tmp_path):
  out = export(finished_run[0], str(tmp_path / "export"))
  text, images = run_notebook("benchmark.ipynb", tmp_path, MMJAX_EXPORT=out)
  assert "zero-shot top-1" in text and "wrote benchmark_results.json" in text and images == 2  # Bars, grid.
  zeroshot, retrieval = json.load(open(tmp_path / "benchmark_results.json"))
  batch = 8 * jax.device_count()  # The notebook's, so the same programs embed.
  want = benchmark("zeroshot_classification", str(tmp_path / "shapes_folder"), export=out, batch_size=batch,
                   templates="a photo of a {}.")
  assert zeroshot["metrics"] == want["metrics"] and zeroshot["metrics"]["images"] == 192
  want = benchmark("retrieval", str(tmp_path / "shapes_karpathy" / "dataset_shapes.json"), export=out, batch_size=batch)
  assert retrieval["metrics"] == want["metrics"] and retrieval["task"] == "retrieval"


def test_finetune_notebook_trains_an_export_then_exports_and_evaluates_it(finished_run, tmp_path):
  out = export(finished_run[0], str(tmp_path / "export"))
  text, images = run_notebook("finetune.ipynb", tmp_path, MMJAX_EXPORT=out, MMJAX_WORKDIR=str(tmp_path / "nb"),
                              MMJAX_STEPS="4", MMJAX_BATCH="16")
  assert "fine-tuning" in text and "4 steps of 16 on 8 CPU device(s)" in text
  assert "before: i2t R@1" in text and "after: i2t R@1" in text and "among 256" in text and images == 1
  assert mmjax.load(str(tmp_path / "nb" / "export")).image_size == mmjax.load(out).image_size


def test_trained_model_exports_to_hf_and_back(finished_run):
  pytest.importorskip("torch", reason="HF export needs torch: pip install -e '.[interop]'")
  from mmjax.interop import from_hf, to_hf
  from tests.test_interop import hf_outputs, mmjax_outputs, rel_err
  task, _, params, _ = runs.restore_params(runs.load_run_config(finished_run[0]), finished_run[0])
  params = jax.device_get(params)
  hf = to_hf(task.model_config, params)
  assert type(hf).__name__ == "SiglipModel"
  images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  text = task.tokenizer.encode(["a red circle", "a small blue square at the top", "two objects", ""], 16)
  ours = mmjax_outputs(task.model_config, params, images, text)
  for a, b in zip(ours, hf_outputs(hf, images, text)):
    assert rel_err(a, b) <= 1e-5
  config_back, params_back = from_hf(hf)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params_back, params)
  for a, b in zip(ours, mmjax_outputs(config_back, params_back, images, text)):
    np.testing.assert_array_equal(a, b)
