"""Real multi-process runs on localhost: `python -m mmjax.train` in 2 processes x 4 CPU devices
joined by `jax.distributed`, against 1 process x 8 devices."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from mmjax.runs import load_run_config, restore_params
from mmjax.rules import path_str

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
              XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]))


def _train_args(workdir, mesh, *extra):
  return [sys.executable, "-m", "mmjax.train", "--config", f"tests/tiny_config.py:{mesh}", "--workdir",
          str(workdir), f"--config.total_steps={STEPS}", "--config.log_every=1", "--config.eval_every=6",
          "--config.keep_checkpoints=3", *extra]


def run_processes(workdir, mesh, processes: int, extra_per_process=None, timeout=600):
  """Starts `processes` trainers (each with 8 / processes CPU devices) and waits for all."""
  port = _free_port()
  procs = []
  for i in range(processes):
    extra = list((extra_per_process or {}).get(i, ()))
    if processes > 1:
      extra += [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}", f"--process_id={i}"]
    procs.append(subprocess.Popen(_train_args(workdir, mesh, *extra), cwd=REPO, env=_env(8 // processes),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outputs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outputs.append((p.returncode, out, err))
  return outputs


def _losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return np.array([r["loss"] for r in rows if "loss" in r])


def _params(workdir):
  config = load_run_config(workdir)
  return jax.device_get(restore_params(config, workdir)[2])


def assert_same_params(got, want):
  """float32 agreement, except attention key biases: their exact gradient is zero (softmax
  ignores a shift shared by all keys), so Adam scales float rounding noise, which depends on
  the summation order, into updates of order 1e-5. They only have to stay that small."""
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    if path_str(path).endswith("key/bias"):
      assert np.abs(a).max() < 1e-3 and np.abs(b).max() < 1e-3, path_str(path)
    else:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=path_str(path))


def _assert_ok(outputs):
  for code, out, err in outputs:
    assert code == 0, err[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  _assert_ok(run_processes(root / "one", "8x1", 1))
  two = run_processes(root / "two", "8x1", 2)
  _assert_ok(two)
  return root, two


def test_two_processes_train_like_one(runs):
  root, outputs = runs
  one, two = str(root / "one"), str(root / "two")
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
  assert len(_losses(one)) == STEPS
  assert_same_params(_params(two), _params(one))
  # Evaluation is split across the processes; every example counts once, so the results agree.
  summaries = [json.load(open(os.path.join(d, "summary.json"))) for d in (one, two)]
  for key, value in summaries[0].items():
    if key.startswith(("zeroshot/", "retrieval/", "binding/")):
      assert summaries[1][key] == pytest.approx(value, abs=1e-6), key
  # Only process 0 logs progress.
  assert "step" in outputs[0][1] and "step" not in outputs[1][1]


def test_two_process_checkpoint_resumes_in_one_process_on_another_mesh(runs, tmp_path):
  root, _ = runs
  resumed = tmp_path / "resumed"
  shutil.copytree(root / "two", resumed)
  shutil.rmtree(resumed / "checkpoints" / str(STEPS))
  os.remove(resumed / "summary.json")
  outputs = run_processes(resumed, "2x4", 1)
  _assert_ok(outputs)
  assert "on a new process count (1)" in outputs[0][1]
  assert_same_params(_params(str(resumed)), _params(str(root / "two")))


def test_packed_captions_train_alike_on_two_processes_and_one(tmp_path):
  """`data.pack_text` on 2 processes: each packs its own captions into the row count both need,
  and the text embeddings come back in batch order across them (the same losses as one process)."""
  flags = ["--config.model.text.causal=True", "--config.model.text.pool=eos", "--config.model.text.max_len=64",
           "--config.data.pack_text=True", "--config.total_steps=3", "--config.eval_every=0"]
  one = run_processes(tmp_path / "one", "8x1", 1, extra_per_process={0: flags})
  two = run_processes(tmp_path / "two", "8x1", 2, extra_per_process={0: flags, 1: flags})
  _assert_ok(one + two)
  # Two shapes captions (up to 25 ids) always fit in a row of 64, so the rows are at most half the
  # batch: the fewest the batch-sharded devices allow.
  assert "text (8, 64), text_positions (8, 64)" in one[0][1] and "text_slot (16,)" in one[0][1]
  assert "text (4, 64), text_positions (4, 64)" in two[0][1] and "text_slot (8,)" in two[0][1]
  np.testing.assert_allclose(_losses(str(tmp_path / "two")), _losses(str(tmp_path / "one")), rtol=1e-5)
  assert len(_losses(str(tmp_path / "one"))) == 3


def _folder_with_bad_images(root, n=20):
  """A caption folder of n records whose records 3, 9 and 14 cannot be read; returns (captions
  file, {bad file: what its reason says})."""
  root.mkdir(parents=True)
  rng = np.random.default_rng(0)
  colours, shapes = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle")
  lines = []
  for i in range(n):
    name = f"{i:02d}.png"
    Image.fromarray(rng.integers(0, 255, (40, 36, 3), np.uint8)).save(root / name)
    lines.append(json.dumps({"image": name, "caption": f"a {colours[i % 4]} {shapes[i % 3]}"}))
  (root / "03.png").write_bytes((root / "03.png").read_bytes()[:100])
  (root / "09.png").write_bytes(b"not an image")
  os.remove(root / "14.png")
  (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
  bad = {str(root / "03.png"): "cannot decode", str(root / "09.png"): "cannot decode",
         str(root / "14.png"): "file not found"}
  return str(root / "captions.jsonl"), bad


def test_unreadable_images_change_no_batch_and_are_named_once(tmp_path):
  """2 processes x 4 devices train like 1 x 8 on a caption folder with unreadable images (each
  replaced by the same stand-in on every process), and over 4.8 epochs each unreadable file is
  counted, logged and listed once, whichever process met it."""
  captions, bad = _folder_with_bad_images(tmp_path / "data")
  flags = ["--config.data.source=folder", f"--config.data.captions={captions}", "--config.eval_every=0"]
  one = run_processes(tmp_path / "one", "8x1", 1, extra_per_process={0: flags})
  two = run_processes(tmp_path / "two", "8x1", 2, extra_per_process={0: flags, 1: flags})
  _assert_ok(one + two)
  np.testing.assert_allclose(_losses(str(tmp_path / "two")), _losses(str(tmp_path / "one")), rtol=1e-5)
  assert_same_params(_params(str(tmp_path / "two")), _params(str(tmp_path / "one")))
  for name, outputs in (("one", one), ("two", two)):
    workdir = tmp_path / name
    assert json.load(open(workdir / "summary.json"))["skipped_images"] == len(bad)
    rows = [json.loads(line) for line in open(workdir / "skipped.jsonl")]
    assert sorted(r["path"] for r in rows) == sorted(bad)
    for r in rows:
      assert r["reason"].startswith(r["path"]) and bad[r["path"]] in r["reason"], r
      assert outputs[0][2].count(f"skipped unreadable image {r['path']}: ") == 1
    assert all("skipped unreadable image" not in err for _, _, err in outputs[1:])
    metrics = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert metrics[-1]["data/skipped"] == len(bad)


@pytest.mark.parametrize("case", ["config", "mesh"])
def test_processes_fail_fast_with_the_same_message(tmp_path, case):
  if case == "config":
    outputs = run_processes(tmp_path, "8x1", 2, extra_per_process={1: ["--config.optim.lr=0.5"]}, timeout=300)
    expected = "optim/lr: 0.002 on process 0, 0.5 on process 1"
  else:
    outputs = run_processes(tmp_path, "3x1", 2, timeout=300)
    expected = "needs 3 devices, but 8 are available"
  messages = []
  for code, _, err in outputs:
    assert code != 0
    lines = [line for line in err.splitlines() if expected in line]
    assert lines, err[-3000:]
    messages.append(lines[0].split("Error: ", 1)[-1])
  assert messages[0] == messages[1]


def test_sigterm_to_one_process_checkpoints_all_at_the_same_step_and_resumes(tmp_path):
  """A preempted host gets SIGTERM; JAX's preemption sync point stops every process at one step."""
  steps = 30
  extra = [f"--config.total_steps={steps}", "--config.checkpoint_every=1000", "--config.eval_every=0"]
  port = _free_port()
  procs = [subprocess.Popen(_train_args(tmp_path, "8x1", *extra, f"--coordinator_address=localhost:{port}",
                                        "--num_processes=2", f"--process_id={i}"),
                            cwd=REPO, env=dict(_env(4), PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    for line in procs[0].stdout:  # Process 0 logs every step; stop process 1 once training runs.
      if line.startswith("step 5"):
        procs[1].send_signal(signal.SIGTERM)
        break
    outputs = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
  finally:
    for p in procs:
      p.kill()
  stopped = []
  for code, _, err in outputs:
    assert code == 143, err[-3000:]
    stopped += [int(m) for m in re.findall(r"stopped at step (\d+) on request", err)]
  assert len(stopped) == 2 and stopped[0] == stopped[1] and 5 <= stopped[0] < steps, stopped
  assert sorted(os.listdir(tmp_path / "checkpoints")) == [str(stopped[0])]
  resumed = run_processes(tmp_path, "8x1", 2, extra_per_process={i: extra for i in range(2)})
  _assert_ok(resumed)
  assert f"resumed {tmp_path} from step {stopped[0]}" in resumed[0][1]
  assert len(_losses(str(tmp_path))) == steps


def test_local_launch_script(tmp_path):
  env = dict(_env(8), PYTHON=sys.executable, PORT=str(_free_port()), DEVICES="8")
  proc = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "--config", "tests/tiny_config.py:4x2",
                         "--workdir", str(tmp_path), "--config.total_steps=2", "--config.eval_every=0"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh {'data': 4, 'fsdp': 2, 'tensor': 1}" in proc.stdout
  assert os.path.isdir(tmp_path / "checkpoints" / "2")
