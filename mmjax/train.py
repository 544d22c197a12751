"""The one trainer: `python -m mmjax.train --config configs/x.py[:arg] --workdir DIR [--config.k=v]`.

Stages, top to bottom: mesh -> task (model, tokenizer, loss) -> data iterator ->
sharded state (fresh or restored) -> jitted step loop with progress, metrics,
checkpoints and evals -> summary table.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import ml_collections
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from mmjax import export as export_lib, optim, parallel, tasks
from mmjax.checkpoint import Checkpointer
from mmjax.data import pipeline
from mmjax.errors import CheckpointError, ConfigError, MMJaxError, NonFiniteLossError, PreemptedError
from mmjax.metrics import MetricWriter, Progress
from mmjax.rules import path_str

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"


def sharded_state(task, config, mesh, rules):
  """Abstract state with shardings, the optimizer, its schedule and a jitted sharded initialiser."""
  dummy = task.dummy_batch(parallel.batch_size_divisor(mesh))
  # Abstract, not `jax.random.key(0)`: an eager key under a mesh of TPU device descriptions
  # (`mmjax.compile` on a CPU host) would be placed on devices that are not there.
  key = jax.eval_shape(jax.random.key, 0)
  boxed = jax.eval_shape(task.init, key, dummy)
  param_shardings = parallel.logical_shardings(mesh, rules, boxed)
  # `.value`, not nn.unbox: unboxing applies sharding constraints, which need traced arrays.
  abstract_params = jax.tree.map(lambda x: x.value, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  tx, lr = optim.make(config.optim, config.total_steps, abstract_params)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = parallel.follow_param_shardings(abstract_opt, abstract_params, param_shardings, mesh)
  shardings = {"params": param_shardings, "opt": opt_shardings, "step": parallel.replicated(mesh)}

  def init(rng):
    params = nn.unbox(task.init(rng, dummy))
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          jax.eval_shape(init, key), shardings)
  return abstract, shardings, tx, lr, jax.jit(init, out_shardings=shardings)


def resolve_batch_size(config, mesh):
  """`config` with `data.batch_size` set from `data.per_device_batch_size` (when > 0) and the
  mesh's batch-sharded devices, so a scale recipe keeps its per-chip batch on any slice."""
  per_device = config.data.get("per_device_batch_size", 0)
  if not per_device:
    return config
  if per_device < 0:
    raise ConfigError(f"data.per_device_batch_size={per_device} must be positive (or 0: use data.batch_size)")
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.data.batch_size = per_device * parallel.batch_size_divisor(mesh)
  return resolved


def load_run_config(workdir: str):
  """The config a run in `workdir` was trained with (written by `train`)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f"{path} not found: {workdir} is not an mmjax training workdir")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_params(config, workdir: str, step: int | None = None):
  """`(task, mesh, params, step)` from a run's checkpoint: the latest one unless `step` is given."""
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.axis_rules(config.axis_rules, mesh)
  task = tasks.get(config.task)(config, mesh)
  ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {ckpt.directory}")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = sharded_state(task, config, mesh, rules)[0]
    state = ckpt.restore(step, abstract)
  ckpt.close()
  return task, mesh, state["params"], step


def load_params(path: str) -> dict:
  """Host copies of the parameters of an export directory or of a run's latest checkpoint."""
  if os.path.exists(os.path.join(path, export_lib.MODEL_CONFIG)):
    return export_lib.load(path)[1]
  return jax.device_get(restore_params(load_run_config(path), path)[2])


def initial_params(params: dict, subtree: str, workdir: str, source_subtree: str | None = None) -> dict:
  """`params` with `params[subtree]` replaced by the latest parameters of the run in `workdir`
  (e.g. a pretrained language model under "lm"), or of an export directory (`mmjax.export`,
  `mmjax.convert`), or by their `source_subtree` (LiT: "img" of a two-tower run), placed with
  the shardings they replace."""
  if subtree not in params:
    raise ConfigError(f"init_from: the model has no parameters {subtree!r}; it has {sorted(params)}")
  loaded = load_params(workdir)
  if source_subtree is not None:
    if source_subtree not in loaded:
      raise ConfigError(f"init_from: {workdir} has no parameters {source_subtree!r}; it has {sorted(loaded)}")
    loaded = loaded[source_subtree]
  target = params[subtree]
  want = {path_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(target)}
  got = {path_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(loaded)}
  if want != got:
    diff = sorted(f"{k}: model {want.get(k)}, {workdir} {got.get(k)}" for k in want.keys() | got.keys()
                  if want.get(k) != got.get(k))
    raise ConfigError(f"init_from ({subtree!r}, {workdir!r}): parameters differ:\n  " + "\n  ".join(diff[:20]))
  placed = jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding), loaded, target)
  return {**params, subtree: placed}


def make_train_step(task, tx, lr, shardings, mesh):
  def step(state, batch, rng):
    rng = jax.random.fold_in(rng, state["step"])
    grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state["params"], batch, rng)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=lr(state["step"]))
    return {"params": params, "opt": opt, "step": state["step"] + 1}, metrics

  return jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(mesh), None),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)


def lower_train_step(config, mesh=None, platform=None, device_kind=None):
  """`(lowered step, abstract state)` of `config`'s training step for abstract inputs at the
  recipe's batch size: nothing is allocated, for lowering tests, compile times and memory analysis.
  `mesh` may hold TPU device descriptions (`mmjax.compile`); `platform` (e.g. "cuda", with the
  `device_kind` "NVIDIA H100") lowers for other hardware than the mesh's devices. Captions are
  unpacked here even with `data.pack_text` (the largest of its row counts)."""
  mesh = parallel.make_mesh(config.mesh) if mesh is None else mesh
  config = resolve_batch_size(config, mesh)
  rules = parallel.axis_rules(config.axis_rules, mesh)
  task = tasks.get(config.task)(config, mesh)
  target = contextlib.nullcontext() if platform is None else parallel.compile_for(platform, device_kind)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules), target:
    abstract, shardings, tx, lr, _ = sharded_state(task, config, mesh, rules)
    step = make_train_step(task, tx, lr, shardings, mesh)
    batch_sharding = parallel.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((config.data.batch_size,) + v.shape[1:], v.dtype, sharding=batch_sharding)
             for k, v in task.dummy_batch(1).items()}
    traced = step.trace(abstract, batch, jax.eval_shape(jax.random.key, 0))
    return traced.lower(lowering_platforms=None if platform is None else (platform,)), abstract


def _check_finite(step: int, metrics: dict, last_saved: int | None) -> float:
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    where = f"step {last_saved}" if last_saved is not None else "none saved yet"
    raise NonFiniteLossError(f"loss is {loss} at step {step}; stopping. Last good checkpoint: {where}. "
                             "Lower optim.lr, raise optim.warmup_steps or check the data.")
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


def summary_table(summary: dict) -> str:
  width = max(len(k) for k in summary)
  lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
  for k, v in summary.items():
    lines.append(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
  return "\n".join(lines)


def train(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir` and returns its summary.

  Raises PreemptedError after saving a checkpoint when the run is asked to stop.
  """
  parallel.check_same_config(config.to_json_best_effort(sort_keys=True))
  mesh = parallel.make_mesh(config.mesh)
  config = resolve_batch_size(config, mesh)
  rules = parallel.axis_rules(config.axis_rules, mesh)
  task = tasks.get(config.task)(config, mesh)
  source = pipeline.make_source(config.data)
  loader = pipeline.Loader(source, tokenizer=task.tokenizer, image_size=config.data.image_size,
                           max_len=task.max_len, global_batch_size=config.data.batch_size,
                           seed=config.seed, worker_count=config.data.worker_count,
                           ops=task.data_ops() if hasattr(task, "data_ops") else None)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))

  ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
  preempted = PreemptionWatch()
  try:  # `close` waits for pending saves, so a crash keeps every checkpoint already started.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return _run(config, workdir, task, mesh, rules, ckpt, loader, preempted)
  finally:
    preempted.close()
    ckpt.close()


def _run(config, workdir, task, mesh, rules, ckpt, loader, preempted) -> dict[str, Any]:
  log = print if jax.process_index() == 0 else (lambda *a, **k: None)
  abstract, shardings, tx, lr, init = sharded_state(task, config, mesh, rules)
  start = ckpt.latest_step()
  if start is None:
    state, start, data_iter = init(jax.random.key(config.seed)), 0, loader.make_iterator()
    for subtree, source, *source_subtree in config.get("init_from", ()):
      state["params"] = initial_params(state["params"], subtree, source, *source_subtree)
      log(f"params[{subtree!r}] from {source}{''.join(f' [{s!r}]' for s in source_subtree)}")
    log(f"new run in {workdir}: {sum(x.size for x in jax.tree.leaves(state['params'])):,} parameters, "
        f"mesh {dict(mesh.shape)}")
  elif ckpt.has_data_state(start):
    data_iter = loader.make_iterator()
    state = ckpt.restore(start, abstract, data_iter)
    log(f"resumed {workdir} from step {start}")
  else:  # Saved by another process count: position the iterator from the step instead.
    data_iter = loader.make_iterator(start_batch=start)
    state = ckpt.restore(start, abstract)
    log(f"resumed {workdir} from step {start} on a new process count ({jax.process_count()}): "
        f"data continues at global batch {start}")

  summary_path = os.path.join(workdir, SUMMARY_FILE)
  if start >= config.total_steps and os.path.exists(summary_path):
    with open(summary_path, encoding="utf-8") as f:
      summary = json.load(f)
    log(f"run complete: {workdir} already reached step {start}/{config.total_steps}")
    log(summary_table(summary))
    return summary

  train_step = make_train_step(task, tx, lr, shardings, mesh)
  writer = MetricWriter(workdir)
  progress = Progress(config.total_steps, config.data.batch_size, start)
  rng = jax.random.key(config.seed + 1)
  last_saved = start if start else None
  evals, pending, skipped, t0 = {}, None, 0, time.perf_counter()
  for step in range(start + 1, config.total_steps + 1):
    local = next(data_iter)
    skipped += int(local.pop(pipeline.SKIPPED))
    if hasattr(task, "prepare_batch"):
      local = task.prepare_batch(local)
    if step == start + 1:
      log("first batch (this process's rows): " + ", ".join(f"{k} {tuple(np.shape(v))}" for k, v in local.items()))
    state, metrics = train_step(state, parallel.global_batch(local, mesh), rng)
    # Check the previous step's loss while this one runs, so dispatch stays asynchronous.
    if pending is not None:
      _check_finite(*pending, last_saved)
    pending = (step, metrics)
    last = step == config.total_steps
    if step % config.log_every == 0 or last:
      loss = _check_finite(step, metrics, last_saved)
      writer.write(step, {**jax.device_get(metrics), **progress.update(step, loss), "data/skipped": skipped})
    stop = preempted(step)
    if step % config.checkpoint_every == 0 or last or stop:
      _check_finite(step, metrics, last_saved)
      ckpt.save(step, state, data_iter)
      last_saved = step
    if stop:
      ckpt.wait()
      raise PreemptedError(f"stopped at step {step} on request (SIGTERM or preemption); checkpoint "
                           f"{ckpt.path(step)} is saved. Run the same command to resume.")
    if config.eval_every and (step % config.eval_every == 0 or last):
      evals = task.evaluate(state["params"])
      writer.write(step, {f"eval/{k}": v for k, v in evals.items()})
      log(f"eval @ {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in evals.items()))
  if not evals and config.eval_every:  # Resumed at the last step, before the final eval ran.
    evals = task.evaluate(state["params"])
  writer.close()

  summary = {**evals, "steps": config.total_steps, "train_seconds": round(time.perf_counter() - t0, 1),
             "skipped_images": skipped, "checkpoint": ckpt.path(config.total_steps)}
  if jax.process_index() == 0:
    with open(summary_path, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
  log(summary_table(summary))
  return summary


def quiet_logs():
  """Orbax and grain log every save at INFO; keep the progress line readable unless asked."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_logs()
  parallel.tune_cpu_runtime()
  f = flags.FLAGS
  parallel.initialize(f.coordinator_address, f.num_processes, f.process_id)
  try:
    train(f.config, f.workdir)
  except PreemptedError as e:
    logging.warning("process %d: %s", jax.process_index(), e)
    sys.exit(143)  # 128 + SIGTERM: what a scheduler expects from a job it asked to stop.
  except MMJaxError as e:  # Every process reports its own error; process 0 is not the only one.
    logging.error("process %d of %d: %s: %s", jax.process_index(), jax.process_count(), type(e).__name__, e)
    raise


if __name__ == "__main__":
  # Flags are defined here, not at import, so other entry points can import this module.
  config_flags.DEFINE_config_file("config", None, "Recipe: configs/<file>.py[:arg].", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the summary go here.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs "
                      "outside SLURM or TPU pods (see mmjax.parallel.initialize).")
  flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
