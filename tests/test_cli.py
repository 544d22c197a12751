"""User errors at the command line: one line naming the culprit, a non-zero exit, no traceback
(unless --verbose). The commands run as users run them, from a directory outside the repository,
all at once."""
import os
import subprocess
import sys

import pytest

import mmjax
from mmjax import config as mmjax_config
from mmjax.errors import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USAGE, RUN = 2, 1

# name: (command after `python -m`, exit status, texts the error line must hold, extra environment)
CASES = {
    "unknown config key": ("mmjax.train --config siglip_shapes --workdir {tmp}/w --config.model.image.widht=64",
                           USAGE, ["--config.model.image.widht", "did you mean width?"], {}),
    "unknown top-level key": ("mmjax.train --config siglip_shapes --workdir {tmp}/w --config.totl_steps=3",
                              USAGE, ["'totl_steps'", "did you mean total_steps?"], {}),
    "missing config file": ("mmjax.train --config {tmp}/nowhere.py --workdir {tmp}/w",
                            USAGE, ["nowhere.py does not exist", "siglip_shapes"], {}),
    "misspelt recipe name": ("mmjax.evaluate --config siglip_shape --workdir {tmp}/w",
                             USAGE, ["siglip_shape does not exist", "did you mean siglip_shapes?"], {}),
    "unknown recipe argument": ("mmjax.train --config clip_shapes:stage=1 --workdir {tmp}/w",
                                USAGE, ["'stage'", "takes no arguments"], {}),
    "value of the wrong type": ("mmjax.train --config siglip_shapes --workdir {tmp}/w --config.total_steps=many",
                                USAGE, ["--config.total_steps=many", "int"], {}),
    "missing flag": ("mmjax.train --config siglip_shapes", USAGE, ["--workdir"], {}),
    "batch the mesh cannot split": (
        "mmjax.train --config siglip_shapes --workdir {tmp}/w --config.data.batch_size=126",
        RUN, ["data.batch_size=126", "4 devices", "multiple of 4"],
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}),
    "mesh larger than the devices": ("mmjax.train --config siglip_shapes --workdir {tmp}/w "
                                     "--config.mesh=(('data',3),)", RUN, ["config.mesh", "3 devices"], {}),
    "missing caption file": ("mmjax.train --config siglip_shapes --workdir {tmp}/w --config.data.source=folder "
                             "--config.data.captions={tmp}/captions.jsonl",
                             RUN, ["DataError", "captions.jsonl"], {}),
    "not a workdir": ("mmjax.evaluate --workdir {tmp}", RUN, ["CheckpointError", "not an mmjax training workdir"], {}),
    "workdir without checkpoints": ("mmjax.evaluate --workdir {tmp}/empty_run", RUN,
                                    ["CheckpointError", "no checkpoint"], {}),
    "benchmark without an export": ("mmjax.evaluate --benchmark retrieval --data {tmp}/coco.json", RUN,
                                    ["ConfigError", "--export"], {}),
    # The argparse commands report the same way.
    "unreadable checkpoint to convert": ("mmjax.convert_checkpoint --from big_vision --source {tmp}/none.npz "
                                         "--out {tmp}/e", RUN, ["ConversionError", "none.npz"], {}),
    "tokenizer corpus missing": ("mmjax.data.tokenizer train --source captions --captions {tmp}/none.jsonl "
                                 "--out {tmp}/t.model", RUN, ["DataError", "none.jsonl"], {}),
    "records source missing": ("mmjax.data.write_records --from folder --source {tmp}/none.jsonl --out {tmp}/ar",
                               RUN, ["DataError", "none.jsonl"], {}),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  """Every case's `(returncode, stderr)`, the commands run concurrently from a temporary directory."""
  tmp = tmp_path_factory.mktemp("cli")
  (tmp / "empty_run").mkdir()
  (tmp / "empty_run" / "config.json").write_text(mmjax_config.load("siglip_shapes").to_json())
  procs = {}
  for name, (command, _, _, env) in CASES.items():
    procs[name] = subprocess.Popen([sys.executable, "-m", *command.format(tmp=tmp).split()], cwd=tmp,
                                   env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return {name: (p.communicate(timeout=300)[1], p.returncode)[::-1] for name, p in procs.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_user_error_prints_one_line_and_exits_non_zero(outcomes, case):
  status, stderr = outcomes[case]
  _, want_status, texts, _ = CASES[case]
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert status == want_status and len(errors) == 1 and "Traceback" not in stderr, stderr
  assert all(text in errors[0] for text in texts), errors[0]


def test_verbose_shows_the_traceback(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "mmjax.train", "--config", "siglip_shapes", "--workdir",
                         str(tmp_path), "--config.totl_steps=3", "--verbose"],
                        capture_output=True, text=True, cwd=tmp_path, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0 and "Traceback" in proc.stderr and "totl_steps" in proc.stderr


def test_load_on_a_training_workdir_says_how_to_export_it(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(CheckpointError, match=r"training workdir.*python -m mmjax.export --workdir"):
    mmjax.load(str(tmp_path))
