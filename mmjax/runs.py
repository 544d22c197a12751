"""A run, from its config to its parameters: what training, compiling, exporting and evaluating share.

`setup` turns a config into its mesh, axis rules and task; `sharded_state` gives the abstract,
sharded training state and its initialiser; `make_train_step` is the one training step, which
`mmjax.train` runs and `mmjax.compile` compiles for TPU slices (`lower_train_step`). The rest
reads finished runs: `load_run_config`, `restore_params`, `load_params`, and `initial_params`
for a run that starts from another's parameters.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmjax import bundle, optim, parallel, tasks
from mmjax.adapt.wrap import BASE as ADAPTED_BASE
from mmjax.checkpoint import Checkpointer
from mmjax.errors import CheckpointError, ConfigError, MeshError
from mmjax.rules import path_str

CONFIG_FILE = "config.json"


class Setup(NamedTuple):
  config: ml_collections.ConfigDict  # With the global batch size resolved for the mesh.
  mesh: jax.sharding.Mesh
  rules: tuple  # The config's axis rules for this mesh.
  task: tasks.Task


def setup(config, mesh=None) -> Setup:
  """The mesh (`config.mesh` unless given), the axis rules, the resolved batch size and the task
  (built under the rules, so its batch divisors follow the `batch` rule)."""
  mesh = parallel.make_mesh(config.mesh) if mesh is None else mesh
  rules = parallel.axis_rules(config.axis_rules, mesh)
  with nn.logical_axis_rules(rules):
    config = resolve_batch_size(config, mesh)
    task = tasks.get(config.task)(config, mesh)
  return Setup(config, mesh, rules, task)


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
  teacher = task.teacher()
  if teacher is not None:  # An EMA of a subtree of the parameters, sharded and checkpointed like it.
    shardings["teacher"] = param_shardings[teacher[0]]

  def init(rng):
    params = nn.unbox(task.init(rng, dummy))
    state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    if teacher is not None:
      state["teacher"] = params[teacher[0]]
    return state

  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          jax.eval_shape(init, key), shardings)
  return abstract, shardings, tx, lr, jax.jit(init, out_shardings=shardings)


def resolve_batch_size(config, mesh):
  """`config` with `data.batch_size` set from `data.per_device_batch_size` (when > 0) and the
  mesh's batch-sharded devices, so a scale recipe keeps its per-chip batch on any slice; raises
  MeshError before any model is built when the mesh cannot split `data.batch_size`."""
  per_device = config.data.get("per_device_batch_size", 0)
  divisor = parallel.batch_size_divisor(mesh)
  if per_device < 0:
    raise ConfigError(f"data.per_device_batch_size={per_device} must be positive (or 0: use data.batch_size)")
  if per_device:
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.batch_size = per_device * divisor
  batch = config.data.get("batch_size", 0)
  if batch and batch % divisor:
    raise MeshError(f"data.batch_size={batch} does not split over the {divisor} devices of the batch axes "
                    f"(mesh {dict(mesh.shape)}); use a multiple of {divisor}, e.g. {batch // divisor * divisor or divisor}")
  return config


def load_run_config(workdir: str):
  """The config a run in `workdir` was trained with (written by `train`)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f"{path} not found: {workdir} is not an mmjax training workdir")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_params(config, workdir: str, step: int | None = None):
  """`(task, mesh, params, step)` from a run's checkpoint: the latest one unless `step` is given."""
  _, mesh, rules, task = setup(config)
  ckpt = Checkpointer(workdir, keep=config.keep_checkpoints, writer=False)  # The run may still be training.
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
  if bundle.is_bundle(path):
    return bundle.load(path)[1]
  return jax.device_get(restore_params(load_run_config(path), path)[2])


def initial_params(params: dict, subtree: str, workdir: str, source_subtree: str | None = None) -> tuple[dict, list]:
  """`(params, new)`: `params` with `params[subtree]` replaced by the latest parameters of the run in
  `workdir` (e.g. a pretrained language model under "lm"), or of an export directory (`mmjax.export`,
  `mmjax.convert_checkpoint`), or by their `source_subtree` (LiT: "img" of a two-tower run), placed
  with the shardings they replace. Subtree "" is the whole model, and "base" an adapted model's base
  (fine-tuning an export): there the model may hold parameters the source lacks (a logit bias for
  the sigmoid loss on a CLIP), which keep their initialisation and are listed in `new`; anywhere
  else (a language model under "lm", a tower) the two must match exactly."""
  if subtree and subtree not in params:
    raise ConfigError(f"init_from: the model has no parameters {subtree!r}; it has {sorted(params)}")
  loaded = load_params(workdir)
  if source_subtree is not None:
    if source_subtree not in loaded:
      raise ConfigError(f"init_from: {workdir} has no parameters {source_subtree!r}; it has {sorted(loaded)}")
    loaded = loaded[source_subtree]
  target = params[subtree] if subtree else params
  want = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(target)}
  got = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(loaded)}
  new = sorted(want.keys() - got.keys()) if subtree in ("", ADAPTED_BASE) else []
  differ = sorted(f"{k}: model {getattr(want.get(k), 'shape', None)}, {workdir} {getattr(got.get(k), 'shape', None)}"
                  for k in want.keys() | got.keys() if k not in new
                  and getattr(want.get(k), "shape", None) != getattr(got.get(k), "shape", None))
  if differ:
    raise ConfigError(f"init_from ({subtree!r}, {workdir!r}): parameters differ:\n  " + "\n  ".join(differ[:20]))
  placed = {k: jax.device_put(np.asarray(got[k]).astype(x.dtype), x.sharding) if k in got else x
            for k, x in want.items()}
  leaves = [placed[path_str(p)] for p, _ in jax.tree_util.tree_leaves_with_path(target)]
  restored = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)
  return ({**params, subtree: restored} if subtree else restored), new


def make_train_step(task, tx, lr, shardings, mesh):
  teacher = task.teacher()

  def step(state, batch, rng):
    rng = jax.random.fold_in(rng, state["step"])
    grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)
    extra = {} if teacher is None else {"teacher": state["teacher"], "step": state["step"]}
    (_, metrics), grads = grad_fn(state["params"], batch, rng, **extra)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # Counted on the updated parameters, so the trainer never saves a state it has not seen finite.
    nonfinite = sum(jnp.sum(~jnp.isfinite(x)) for x in jax.tree.leaves(params))
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=lr(state["step"]), nonfinite_params=nonfinite)
    new_state = {"params": params, "opt": opt, "step": state["step"] + 1}
    if teacher is not None:
      subtree, decay = teacher
      new_state["teacher"] = optax.incremental_update(params[subtree], state["teacher"], 1.0 - decay)
    return new_state, metrics

  return jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(mesh), None),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)


def lower_train_step(config, mesh=None, platform=None, device_kind=None):
  """`(lowered step, abstract state)` of `config`'s training step for abstract inputs at the
  recipe's batch size: nothing is allocated, for lowering tests, compile times and memory analysis.
  `mesh` may hold TPU device descriptions (`mmjax.compile`); `platform` (e.g. "cuda", with the
  `device_kind` "NVIDIA H100") lowers for other hardware than the mesh's devices. Captions are
  unpacked here even with `data.pack_text` (the largest of its row counts)."""
  config, mesh, rules, task = setup(config, mesh)
  target = contextlib.nullcontext() if platform is None else parallel.compile_for(platform, device_kind)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules), target:
    abstract, shardings, tx, lr, _ = sharded_state(task, config, mesh, rules)
    step = make_train_step(task, tx, lr, shardings, mesh)
    batch_sharding = parallel.batch_sharding(mesh)
    batch = jax.tree.map(lambda v: jax.ShapeDtypeStruct((config.data.batch_size,) + v.shape[1:], v.dtype,
                                                        sharding=batch_sharding), task.dummy_batch(1))
    traced = step.trace(abstract, batch, jax.eval_shape(jax.random.key, 0))
    return traced.lower(lowering_platforms=None if platform is None else (platform,)), abstract
