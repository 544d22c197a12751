"""Kill/restart trials of `python -m mmjax.train`: SIGKILL during a step or during an
asynchronous checkpoint save, SIGTERM for preemption; then restart and compare.

  python -m tests.fault_injection --trials 20     # prints one line per trial and a tally

Each trial checks that every checkpoint left on disk restores, and that the restarted run
reaches bit-identical parameters to an uninterrupted run (CPU, deterministic).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 40, 5
KINDS = ("step", "save", "sigterm")


def command(workdir: str) -> list[str]:
  return [sys.executable, "-m", "mmjax.train", "--config", "tests/tiny_config.py:8x1", "--workdir", workdir,
          f"--config.total_steps={STEPS}", f"--config.checkpoint_every={EVERY}", "--config.log_every=5",
          "--config.eval_every=0", "--config.keep_checkpoints=2"]


def _env() -> dict:
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
              XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=8"]))


def start(workdir: str) -> subprocess.Popen:
  return subprocess.Popen(command(workdir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(workdir: str) -> None:
  proc = subprocess.run(command(workdir), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  if proc.returncode:
    raise RuntimeError(f"run in {workdir} failed:\n{proc.stderr[-3000:]}")


def _entries(workdir: str) -> list[str]:
  path = os.path.join(workdir, "checkpoints")
  return os.listdir(path) if os.path.isdir(path) else []


def _wait_for(proc, condition, timeout=300.0, poll=0.001) -> bool:
  """Polls until `condition()` or the process exits; True if the condition came first."""
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if condition():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(poll)
  raise TimeoutError("trial timed out")


def params(workdir: str, step: int | None = None):
  from mmjax import runs
  config = runs.load_run_config(workdir)
  return jax.device_get(runs.restore_params(config, workdir, step)[2])


def committed_steps(workdir: str) -> list[int]:
  from mmjax.checkpoint import Checkpointer
  ckpt = Checkpointer(workdir, keep=2)
  steps = list(ckpt.manager.all_steps())
  ckpt.close()
  return sorted(steps)


def trial(kind: str, workdir: str, rng: random.Random, max_delay: float = 1.0) -> dict:
  """One interrupted run, checked and restarted to the end. Returns what happened."""
  proc = start(workdir)
  first = _wait_for(proc, lambda: str(EVERY) in _entries(workdir), poll=0.01)
  interrupted_at = None
  if first:
    if kind == "save":  # The moment an asynchronous save has started writing.
      hit = _wait_for(proc, lambda: any(not e.isdigit() for e in _entries(workdir)))
    else:
      time.sleep(rng.uniform(0.0, max_delay))
      hit = proc.poll() is None
    if hit:
      proc.send_signal(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
      interrupted_at = sorted(_entries(workdir))
  _, err = proc.communicate(timeout=300)
  # Checked on a copy: opening a checkpoint manager removes half-written saves, which is the
  # restarted trainer's job here.
  copy = workdir + ".check"
  shutil.copytree(workdir, copy)
  steps = committed_steps(copy)
  for step in steps:  # Every checkpoint Orbax reports restores in full.
    params(copy, step)
  outcome = dict(kind=kind, returncode=proc.returncode, interrupted=interrupted_at is not None,
                 on_disk=interrupted_at, committed=steps, stderr=err,
                 half_written=[e for e in _entries(workdir) if not e.isdigit()])
  finish(workdir)
  outcome["left_over"] = [e for e in _entries(workdir) if not e.isdigit()]
  return outcome


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--trials", type=int, default=9)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  os.environ.update(_env())  # Before the first device use, so this process sees 8 devices too.
  rng = random.Random(args.seed)
  with tempfile.TemporaryDirectory() as root:
    finish(os.path.join(root, "reference"))
    want = params(os.path.join(root, "reference"))
    tally = {}
    for i in range(args.trials):
      kind = KINDS[i % len(KINDS)]
      workdir = os.path.join(root, f"trial{i}")
      outcome = trial(kind, workdir, rng)
      same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params(workdir)), jax.tree.leaves(want)))
      result = ("identical" if same else "DIFFERENT") if outcome["interrupted"] else "finished before the signal"
      key = (kind, result)
      tally[key] = tally.get(key, 0) + 1
      print(f"trial {i:2d} {kind:7s} exit {outcome['returncode']:4d} committed {outcome['committed']} "
            f"-> {result}", flush=True)
  print("\n| interruption | outcome | trials |\n|---|---|---|")
  for (kind, result), n in sorted(tally.items()):
    print(f"| {kind} | {result} | {n} |")


if __name__ == "__main__":
  main()
