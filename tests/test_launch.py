"""Launch scripts against stand-ins that record each command. launch/tpu_pod.sh (stand-in `gcloud`):
the step is compiled for the pod's topology on host 0 before any host trains, and a step that does
not fit stops it. launch/slurm.sh (stand-in `srun` and `scontrol`): a trainer stopped by SIGTERM
(exit 143) has the job requeued, once; any other exit is passed on without a requeue."""
import os
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_GCLOUD = """#!/usr/bin/env bash
echo "$*" >> "$CALLS_LOG"
case "$*" in
  *"tpu-vm describe"*) echo "V5LITE_POD 8x8" ;;
  *"--worker=0"*"mmjax.compile"*) exit "${COMPILE_RC:-0}" ;;
esac
"""


FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$CALLS_LOG"
exit "$TRAIN_RC"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$CALLS_LOG"
"""


def run_with_stand_ins(tmp_path, script, stand_ins, **env):
  """`bash launch/<script> --config ... --workdir ...` with `stand_ins` ({name: bash source}) first on
  PATH; each appends its command line to one log. Returns the result and the logged commands."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, source in stand_ins.items():
    (bin_dir / name).write_text(source)
    (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
  log = tmp_path / "calls.log"
  log.touch()
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS_LOG=str(log), **env)
  result = subprocess.run(["bash", f"launch/{script}", "--config", "configs/siglip_b16.py", "--workdir", "/mnt/runs/b16",
                           "--config.model.attention_impl=pallas"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
  return result, log.read_text().splitlines()


def run_pod_script(tmp_path, compile_rc):
  return run_with_stand_ins(tmp_path, "tpu_pod.sh", {"gcloud": FAKE_GCLOUD}, COMPILE_RC=str(compile_rc),
                            TPU_NAME="pod", ZONE="us-west4-a", REPO_URL="https://example.com/mmjax")


@pytest.mark.parametrize("compile_rc", [0, 1])
def test_pod_launch_compiles_for_the_topology_before_training(tmp_path, compile_rc):
  result, calls = run_pod_script(tmp_path, compile_rc)
  compile_calls = [c for c in calls if "mmjax.compile" in c]
  assert len(compile_calls) == 1 and "--worker=0" in compile_calls[0]
  assert "--topology v5e:8x8" in compile_calls[0] and "--config.model.attention_impl=pallas" in compile_calls[0]
  assert "--workdir" not in compile_calls[0]
  trains = [i for i, c in enumerate(calls) if "mmjax.train" in c]
  if compile_rc:
    assert result.returncode != 0 and not trains
  else:
    assert result.returncode == 0, result.stderr
    assert trains == [len(calls) - 1] and calls.index(compile_calls[0]) < trains[0]
    assert "--worker=all" in calls[-1] and "--workdir /mnt/runs/b16" in calls[-1]


@pytest.mark.parametrize("train_rc", [143, 0, 1])
def test_slurm_job_requeues_itself_when_the_trainer_stops_on_sigterm(tmp_path, train_rc):
  result, calls = run_with_stand_ins(tmp_path, "slurm.sh", {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL},
                                     TRAIN_RC=str(train_rc), SLURM_JOB_ID="4242", PYTHON="python3")
  assert result.returncode == train_rc, result.stderr
  assert calls[0] == ("srun --kill-on-bad-exit=1 python3 -m mmjax.train --config configs/siglip_b16.py "
                      "--workdir /mnt/runs/b16 --config.model.attention_impl=pallas")
  assert calls[1:] == (["scontrol requeue 4242"] if train_rc == 143 else [])
