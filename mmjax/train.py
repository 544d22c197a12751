"""The one trainer: `python -m mmjax.train --config configs/x.py[:arg] --workdir DIR [--config.k=v]`.

`train` reads top to bottom in stages: mesh and task (`runs.setup`) -> data -> state (fresh,
from `init_from`, or resumed) -> step -> loop (progress, metrics, checkpoints, periodic evals)
-> final evals and summary. What it shares with compiling, exporting and evaluating is in
`mmjax.runs`.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from mmjax import cli, parallel, runs, runtime
from mmjax.checkpoint import Checkpointer
from mmjax.data import pipeline
from mmjax.errors import NonFiniteLossError, PreemptedError
from mmjax.metrics import MetricWriter, Progress, summary_table

SUMMARY_FILE = "summary.json"


def _log(*args):
  if jax.process_index() == 0:
    print(*args)


def _check_finite(step: int, metrics: dict, last_saved: int | None) -> float:
  """The step's loss; raises if the loss, the gradient norm or any updated parameter is NaN or Inf,
  naming the last checkpoint saved (every save is checked first, so it holds finite parameters)."""
  loss, grad_norm, nonfinite = (float(metrics["loss"]), float(metrics["grad_norm"]),
                                int(metrics["nonfinite_params"]))
  problem = (f"loss is {loss}" if not np.isfinite(loss) else
             f"the gradient norm is {grad_norm} (the loss, {loss:.4f}, is finite)" if not np.isfinite(grad_norm) else
             f"{nonfinite:,} updated parameter values are NaN or Inf" if nonfinite else None)
  if problem is not None:
    where = f"step {last_saved}" if last_saved is not None else "none saved yet"
    raise NonFiniteLossError(f"{problem} at step {step}; stopping without saving it. Last good checkpoint: "
                             f"{where}. Lower optim.lr, raise optim.warmup_steps or check the data.")
  return loss


class PreemptionWatch:
  """Whether the run should checkpoint and stop at a step.

  One process: SIGTERM (what schedulers send before killing) sets a flag. Several
  processes: JAX's preemption sync point, so that every process stops at the same step.
  """

  def __init__(self):
    self.requested = False
    self._multi = jax.process_count() > 1
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    self.requested = True

  def __call__(self, step: int) -> bool:
    return multihost_utils.reached_preemption_sync_point(step) if self._multi else self.requested

  def close(self):
    if not self._multi:
      signal.signal(signal.SIGTERM, self._previous)


def train(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir` and returns its summary.

  Raises PreemptedError after saving a checkpoint when the run is asked to stop.
  """
  # Mesh and task.
  parallel.check_same_config(config.to_json_best_effort(sort_keys=True))
  config, mesh, rules, task = runs.setup(config)
  # Data.
  loader = pipeline.Loader(task.source(config.data), tokenizer=task.tokenizer, image_size=config.data.image_size,
                           max_len=task.max_len, global_batch_size=config.data.batch_size, seed=config.seed,
                           worker_count=config.data.worker_count, ops=task.data_ops(),
                           augment=pipeline.augmentation(config.data))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, runs.CONFIG_FILE), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))

  ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
  preempted = PreemptionWatch()
  try:  # `close` waits for pending saves, so a crash keeps every checkpoint already started.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      # State.
      abstract, shardings, tx, lr, init = runs.sharded_state(task, config, mesh, rules)
      state, start, data_iter = _start_state(config, workdir, mesh, ckpt, loader, abstract, init)
      summary_path = os.path.join(workdir, SUMMARY_FILE)
      if start >= config.total_steps and os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as f:
          summary = json.load(f)
        _log(f"run complete: {workdir} already reached step {start}/{config.total_steps}")
        _log(summary_table(summary))
        return summary
      # Step and loop.
      train_step = runs.make_train_step(task, tx, lr, shardings, mesh)
      earlier, t0 = (ckpt.train_seconds(start) if start else 0.0), time.perf_counter()
      elapsed = lambda: earlier + time.perf_counter() - t0  # Over every segment of a resumed run.
      state, evals, skipped = _loop(config, workdir, task, mesh, train_step, state, start, data_iter, ckpt,
                                    preempted, elapsed)
      # Final evals and summary.
      if not evals and config.eval_every:  # Resumed at the last step, before the final eval ran.
        evals = task.evaluate(state["params"])
      summary = {**evals, "steps": config.total_steps, "train_seconds": round(elapsed(), 1),
                 "skipped_images": skipped, "checkpoint": ckpt.path(config.total_steps)}
      if jax.process_index() == 0:
        with open(summary_path, "w", encoding="utf-8") as f:
          json.dump(summary, f, indent=2)
      _log(summary_table(summary))
      return summary
  finally:
    preempted.close()
    ckpt.close()


def _start_state(config, workdir, mesh, ckpt, loader, abstract, init):
  """`(state, step, data iterator)`: fresh (with `config.init_from`), or resumed from the latest
  checkpoint with the data iterator where it was."""
  start = ckpt.latest_step()
  if start is None:
    state = init(jax.random.key(config.seed))
    for subtree, source, *source_subtree in config.get("init_from", ()):
      state["params"], new = runs.initial_params(state["params"], subtree, source, *source_subtree)
      where = f"params[{subtree!r}]" if subtree else "all params"
      _log(f"{where} from {source}{''.join(f' [{s!r}]' for s in source_subtree)}"
           + (f"; new, not in {source}: {', '.join(new)}" if new else ""))
    _log(f"new run in {workdir}: {sum(x.size for x in jax.tree.leaves(state['params'])):,} parameters, "
         f"mesh {dict(mesh.shape)}")
    return state, 0, loader.make_iterator()
  if ckpt.has_data_state(start):
    data_iter = loader.make_iterator()
    state = ckpt.restore(start, abstract, data_iter)
    _log(f"resumed {workdir} from step {start}")
    return state, start, data_iter
  # Saved by another process count: position the iterator from the step instead.
  data_iter = loader.make_iterator(start_batch=start)
  state = ckpt.restore(start, abstract)
  _log(f"resumed {workdir} from step {start} on a new process count ({jax.process_count()}): "
       f"data continues at global batch {start}")
  return state, start, data_iter


def _loop(config, workdir, task, mesh, train_step, state, start, data_iter, ckpt, preempted, elapsed):
  """Steps `start + 1 .. total_steps`; returns `(state, last evals, skipped images)`."""
  writer = MetricWriter(workdir)
  progress = Progress(config.total_steps, config.data.batch_size, start)
  rng = jax.random.key(config.seed + 1)
  last_saved = start if start else None
  evals, pending = {}, None
  skipped = pipeline.SkippedImages(workdir, resume=start > 0)
  for step in range(start + 1, config.total_steps + 1):
    local = next(data_iter)
    skipped.add(local.pop(pipeline.SKIPPED))
    local = task.prepare_batch(local)
    if step == start + 1:
      shapes = {k: jax.tree.map(lambda x: tuple(np.shape(x)), v) for k, v in local.items()}
      _log("first batch (this process's rows): " + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    state, metrics = train_step(state, parallel.global_batch(local, mesh), rng)
    # Check the previous step's loss while this one runs, so dispatch stays asynchronous.
    if pending is not None:
      _check_finite(*pending, last_saved)
    pending = (step, metrics)
    last = step == config.total_steps
    if step % config.log_every == 0 or last:
      loss = _check_finite(step, metrics, last_saved)
      writer.write(step, {**jax.device_get(metrics), **progress.update(step, loss), "data/skipped": skipped.gather()})
    stop = preempted(step)
    if step % config.checkpoint_every == 0 or last or stop:
      _check_finite(step, metrics, last_saved)
      skipped.gather()  # So skipped.jsonl, which a resumed run reads back, covers the saved steps.
      ckpt.save(step, state, data_iter, train_seconds=elapsed())
      last_saved = step
    if stop:
      ckpt.wait()
      raise PreemptedError(f"stopped at step {step} on request (SIGTERM or preemption); checkpoint "
                           f"{ckpt.path(step)} is saved. Run the same command to resume.")
    if config.eval_every and (step % config.eval_every == 0 or last):
      evals = task.evaluate(state["params"])
      if evals:
        writer.write(step, {f"eval/{k}": v for k, v in evals.items()})
        _log(f"eval @ {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in evals.items()))
  writer.close()
  return state, evals, len(skipped.files)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.quiet_logs()
  runtime.tune_cpu_runtime()
  cli.join_processes()
  try:
    train(flags.FLAGS.config, flags.FLAGS.workdir)
  except PreemptedError as e:
    logging.warning("process %d: %s", jax.process_index(), e)
    sys.exit(143)  # 128 + SIGTERM: what a scheduler expects from a job it asked to stop.


if __name__ == "__main__":
  # Flags are defined here, not at import, so other entry points can import this module.
  config_flags.DEFINE_config_file("config", None, "Recipe: a shipped recipe's name (siglip_shapes) or a file, path/to/recipe.py[:arg].", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the summary go here.")
  cli.define_process_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
