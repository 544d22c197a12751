"""launch/tpu_pod.sh against a stand-in `gcloud` that records each command: the step is compiled
for the pod's topology on host 0 before any host trains, and a step that does not fit stops it."""
import os
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_GCLOUD = """#!/usr/bin/env bash
echo "$*" >> "$GCLOUD_LOG"
case "$*" in
  *"tpu-vm describe"*) echo "V5LITE_POD 8x8" ;;
  *"--worker=0"*"mmjax.compile"*) exit "${COMPILE_RC:-0}" ;;
esac
"""


def run_pod_script(tmp_path, compile_rc):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  log = tmp_path / "gcloud.log"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", GCLOUD_LOG=str(log), COMPILE_RC=str(compile_rc),
             TPU_NAME="pod", ZONE="us-west4-a", REPO_URL="https://example.com/mmjax")
  result = subprocess.run(["bash", "launch/tpu_pod.sh", "--config", "configs/siglip_b16.py", "--workdir", "/mnt/runs/b16",
                           "--config.model.attention_impl=pallas"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
  return result, log.read_text().splitlines()


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
