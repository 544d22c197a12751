"""Metrics to JSONL and TensorBoard, the progress line and the summary table; written by process 0 only."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


def fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricWriter:
  """Appends `{"step": n, **scalars}` to `WORKDIR/metrics.jsonl` and writes TensorBoard events."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """`step 120/2000 | loss 3.2100 | 410.5 samples/s | ETA 4m12s`, measured over the last window."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int):
    self.total, self.batch_size = total_steps, batch_size
    self._step, self._time = start_step, time.perf_counter()
    self.enabled = jax.process_index() == 0

  def update(self, step: int, loss: float) -> dict:
    now = time.perf_counter()
    steps_per_s = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    rate = {"samples_per_s": steps_per_s * self.batch_size, "steps_per_s": steps_per_s}
    if self.enabled:
      eta = (self.total - step) / max(steps_per_s, 1e-9)
      print(f"step {step}/{self.total} | loss {loss:.4f} | {rate['samples_per_s']:.1f} samples/s"
            f" | ETA {fmt_duration(eta)}", flush=True)
    return rate


def summary_table(summary: dict) -> str:
  width = max(len(k) for k in summary)
  lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
  for k, v in summary.items():
    lines.append(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
  return "\n".join(lines)
