"""Damaged, half-written and mismatched checkpoints (mmjax/checkpoint.py): each raises a
CheckpointError that names the file and what to do, or is skipped with a warning; none loads
in part. Every test corrupts a copy of one tiny run with checkpoints at steps 2 and 4."""
import os
import re
import shutil

import jax
import numpy as np
import pytest

from mmjax import runs, train as train_lib
from mmjax.errors import CheckpointError
from tests.helpers import tiny_config


def _config(**overrides):
  return tiny_config(total_steps=4, checkpoint_every=2, eval_every=0, **overrides)


def _params(workdir, step=None):
  return jax.device_get(runs.restore_params(runs.load_run_config(workdir), workdir, step)[2])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  train_lib.train(_config(), workdir)
  return workdir


@pytest.fixture
def copy(run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(run, workdir)
  os.remove(os.path.join(workdir, train_lib.SUMMARY_FILE))  # So `train` resumes rather than reports.
  return workdir


def _step(workdir, step):
  return os.path.join(workdir, "checkpoints", str(step))


def _array_files(workdir, step):
  """The data files of `step`'s OCDBT database. Which arrays each holds, and whether a file is still
  referenced at all (OCDBT keeps superseded writes), varies between saves, so tests damage them all."""
  data = os.path.join(_step(workdir, step), "state", "ocdbt.process_0", "d")
  return [os.path.join(data, f) for f in os.listdir(data)]


def _truncate(*paths, size=16):
  for path in paths:
    os.truncate(path, size)


def _remove(*paths):
  for path in paths:
    os.remove(path)


def _assert_same_params(got_workdir, want_workdir):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               _params(got_workdir), _params(want_workdir))


@pytest.mark.parametrize("damage, named", [
    (lambda w: _truncate(*_array_files(w, 4)), r'Error reading "[^"]+" in OCDBT database at local file "{state}/"'),
    (lambda w: _remove(*_array_files(w, 4)), r'Error reading "[^"]+" in OCDBT database at local file "{state}/"'),
    (lambda w: _remove(os.path.join(_step(w, 4), "state", "manifest.ocdbt")), r'in OCDBT database at local file "{state}/"'),
    (lambda w: _truncate(os.path.join(_step(w, 4), "state", "manifest.ocdbt")), r'decoding local file "{state}/manifest.ocdbt"'),
    (lambda w: _truncate(os.path.join(_step(w, 4), "data", "process_0-of-1.json"), size=8), r"Unterminated string"),
], ids=["truncated array files", "missing array files", "missing manifest", "truncated manifest", "truncated data state"])
def test_a_damaged_step_raises_naming_it_and_the_previous_step(copy, damage, named):
  damage(copy)
  step4 = re.escape(_step(copy, 4))
  with pytest.raises(CheckpointError, match=rf"(?s)cannot read {step4}: a file in it is truncated, missing or corrupt: "
                                            rf".*{named.format(state=step4 + '/state')}.*Delete {step4} .*to resume from step 2"):
    train_lib.train(_config(), copy)


def test_deleting_the_damaged_step_as_told_resumes_from_the_previous_one(run, copy):
  _truncate(*_array_files(copy, 4))
  with pytest.raises(CheckpointError, match="resume from step 2"):
    train_lib.train(_config(), copy)
  shutil.rmtree(_step(copy, 4))
  train_lib.train(_config(), copy)
  _assert_same_params(copy, run)


def test_a_damaged_step_with_none_before_it_says_so(copy):
  # `restore_params` (evaluate, export) reads through the same checks as the trainer.
  shutil.rmtree(_step(copy, 2))
  _remove(*_array_files(copy, 4))
  with pytest.raises(CheckpointError, match=rf"No earlier step is kept: delete {re.escape(_step(copy, 4))} to start"):
    _params(copy)


@pytest.mark.parametrize("half_written, step, previous", [
    (lambda w: os.remove(os.path.join(_step(w, 4), "state", "_METADATA")), 4, 2),
    (lambda w: os.mkdir(_step(w, 6)), 6, 4),
], ids=["step without its metadata", "empty step directory"])
def test_a_listed_step_written_in_part_raises(copy, half_written, step, previous):
  half_written(copy)
  path = re.escape(_step(copy, step))
  with pytest.raises(CheckpointError, match=rf"{path}/state/_METADATA is missing: step {step} was not saved or copied "
                                            rf"in full\. Delete {path} .*to resume from step {previous}\."):
    _params(copy)


def test_a_save_cut_short_is_skipped_with_a_warning_and_removed(run, copy):
  # What a crash during the asynchronous save of step 4 leaves: Orbax's temporary directory.
  tmp = os.path.join(copy, "checkpoints", "4.orbax-checkpoint-tmp-1700000000000000")
  os.rename(_step(copy, 4), tmp)
  with pytest.warns(UserWarning, match=rf"removing {re.escape(tmp)}: a save cut short"):
    train_lib.train(_config(), copy)  # Resumes from step 2.
  assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == ["2", "4"]
  _assert_same_params(copy, run)


def test_a_reader_leaves_a_save_in_progress_alone(copy):
  # Evaluating or exporting a run while it trains must not delete the save it is writing.
  tmp = os.path.join(copy, "checkpoints", "6.orbax-checkpoint-tmp-1700000000000000")
  shutil.copytree(_step(copy, 4), tmp)
  assert runs.restore_params(runs.load_run_config(copy), copy)[3] == 4
  assert os.path.isdir(tmp)


@pytest.mark.parametrize("change, listed", [
    (dict(mlp_dim=128), r"params/img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel: checkpoint \(32, 64\), "
                        r"model \(32, 128\)"),
    (dict(depth=2), r"params/img/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel: checkpoint absent, "
                    r"model \(32, 64\)"),
], ids=["shapes", "tree"])
def test_a_config_that_builds_another_model_raises_listing_the_arrays(copy, change, listed):
  config = _config()
  config.model.image.update(change)
  with pytest.raises(CheckpointError) as raised:
    train_lib.train(config, copy)
  message = str(raised.value)
  assert re.search(rf"{re.escape(_step(copy, 4))} does not fit the configured model: \d+ arrays differ", message)
  assert re.search(listed, message), message
  assert "resume from step" not in message  # Every step has the same arrays.
