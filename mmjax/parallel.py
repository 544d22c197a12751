"""Processes, meshes, logical axis rules and global arrays: where parallelism is decided.

Models annotate parameters and activations with logical axis names; the config
holds one table mapping those names to the mesh axes `data`, `fsdp` and `tensor`.
Everything here turns that table into `NamedSharding`s.

Several hosts run the same program (JAX's multi-controller model): `initialize` joins
them, each process feeds its slice of every global batch (`global_batch`), and
`check_same_config` stops a run whose processes were started with different configs.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mmjax.errors import ConfigError, MeshError
from mmjax.rules import path_str

MESH_AXES = ("data", "fsdp", "tensor")
# Logical axis -> mesh axes: `config.axis_rules`' default (mmjax.config). `batch` places the input
# batch, the losses and the step; `act_batch` the activations inside the models.
DEFAULT_AXIS_RULES = (("batch", ("data", "fsdp")), ("act_batch", ("data", "fsdp")), ("embed", "fsdp"),
                      ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"))
# Set to 1 to let `jax.distributed.initialize()` detect the cluster (TPU pod metadata,
# SLURM, Open MPI, ...) where the variables below do not reveal it.
DISTRIBUTED_ENV = "MMJAX_DISTRIBUTED"


def in_cluster(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether the environment describes a multi-process job: `srun` with several tasks,
  several TPU pod hosts, or MMJAX_DISTRIBUTED set."""
  slurm = int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in environ
  tpu_pod = len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
  return slurm or tpu_pod or environ.get(DISTRIBUTED_ENV, "") not in ("", "0")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins a multi-process run and returns True, or does nothing and returns False.

  Explicit arguments (the trainer's `--coordinator_address/--num_processes/--process_id`)
  win; otherwise SLURM, TPU pod or `MMJAX_DISTRIBUTED=1` environments are joined with
  JAX's own cluster detection. A single CPU or GPU host needs nothing. Call it before
  anything touches a JAX device.
  """
  explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id}
  if any(v is not None for v in explicit.values()):
    missing = [k for k, v in explicit.items() if v is None]
    if missing:
      raise ConfigError(f"--{', --'.join(missing)}: required with the other multi-process flags {explicit}")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if not in_cluster():
    return False
  jax.distributed.initialize()
  return True


def check_same_config(config_json: str) -> None:
  """Raises the same ConfigError on every process unless all processes hold this config.

  Every process gathers every config, so all of them name the same differing keys
  (and none is left waiting in a collective the others never reach).
  """
  if jax.process_count() == 1:
    return
  data = np.frombuffer(config_json.encode("utf-8"), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  configs = [{path_str(path): value for path, value in
              jax.tree_util.tree_leaves_with_path(json.loads(bytes(row[:n]).decode("utf-8")))}
             for row, n in zip(rows, lengths)]
  lines = []
  for index, other in enumerate(configs[1:], 1):
    for key in sorted(set(configs[0]) | set(other)):
      if configs[0].get(key) != other.get(key):
        lines.append(f"  {key}: {configs[0].get(key)!r} on process 0, {other.get(key)!r} on process {index}")
  if lines:
    raise ConfigError("the processes of this run were started with different configs; "
                      "start every process with the same command:\n" + "\n".join(lines))


_TARGET_PLATFORM = contextvars.ContextVar("mmjax_target_platform", default=None)


@contextlib.contextmanager
def compile_for(platform: str, device_kind: str | None = None):
  """Code traced (and lowered) inside this block builds for `platform` ("tpu", "gpu" or "cpu";
  "cuda" and "rocm" mean "gpu"), whatever this host runs: `mmjax.compile --platform cuda`
  lowers a GPU step on a CPU host this way. `device_kind` (e.g. "NVIDIA H100") also names the
  device to JAX through the abstract mesh, as Pallas's Triton lowering needs since jax 0.11."""
  family = _platform_family(platform)
  token = _TARGET_PLATFORM.set(family)
  try:
    if device_kind is None:
      yield
    else:
      device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform=family)
      with jax.sharding.use_abstract_mesh(jax.sharding.get_abstract_mesh().update(abstract_device=device)):
        yield
  finally:
    _TARGET_PLATFORM.reset(token)


def target_platform() -> str:
  """The platform the code being traced will run on: "tpu", "gpu" or "cpu".

  In order: a `compile_for` block; the devices of the mesh in scope (`jax.set_mesh` of TPU
  device descriptions when compiling ahead of time for a slice); this host's default backend.
  Kernels ask this, never `jax.default_backend()`, so that an ahead-of-time compile picks the
  target's kernel, block sizes and compiler parameters."""
  forced = _TARGET_PLATFORM.get()
  if forced is not None:
    return forced
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return _platform_family(device.platform if device is not None else jax.default_backend())


def _platform_family(platform: str) -> str:
  platform = platform.lower()
  if platform not in ("tpu", "gpu", "cuda", "rocm", "cpu"):
    raise ConfigError(f"platform {platform!r}: expected tpu, gpu (cuda, rocm) or cpu")
  return "gpu" if platform in ("cuda", "rocm") else platform


def make_mesh(mesh_config: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds a mesh from `(("data", -1), ("fsdp", 1), ...)`; one `-1` takes the remaining devices.

  Devices are ordered by process, so each process's devices hold a contiguous block of
  the outer (batch) axes: its slice of every global batch.
  """
  devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
  names = tuple(str(name) for name, _ in mesh_config)
  sizes = [int(size) for _, size in mesh_config]
  unknown = [n for n in names if n not in MESH_AXES]
  if unknown:
    raise MeshError(f"config.mesh names unknown axes {unknown}; allowed: {MESH_AXES}")
  if len(set(names)) != len(names):
    raise MeshError(f"config.mesh repeats an axis: {names}")
  fills = [i for i, s in enumerate(sizes) if s == -1]
  if len(fills) > 1:
    raise MeshError(f"config.mesh may hold at most one -1, got {tuple(mesh_config)}")
  fixed = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"config.mesh sizes must be positive or -1, got {tuple(mesh_config)}")
  if fills:
    if len(devices) % fixed:
      raise MeshError(f"config.mesh {tuple(mesh_config)}: {len(devices)} devices are not divisible "
                      f"by the fixed axes' product {fixed}")
    sizes[fills[0]] = len(devices) // fixed
  if math.prod(sizes) != len(devices):
    raise MeshError(f"config.mesh {tuple(mesh_config)} needs {math.prod(sizes)} devices, "
                    f"but {len(devices)} are available")
  device_grid = np.asarray(devices).reshape(sizes)
  return Mesh(device_grid, names, axis_types=(AxisType.Auto,) * len(names))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The axes of `mesh` the batch is split over: the `batch` rule of the axis rules in scope
  (`nn.logical_axis_rules(config.axis_rules)`, as the trainer runs), else of DEFAULT_AXIS_RULES."""
  target = dict(nn.get_logical_axis_rules() or DEFAULT_AXIS_RULES).get("batch")
  targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
  return tuple(a for a in targets if a in mesh.axis_names)


def axes_size(mesh, axes) -> int:
  """Devices along `axes` of `mesh`: a mesh axis name, a tuple of them, or None (1)."""
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def batch_size_divisor(mesh: Mesh) -> int:
  return axes_size(mesh, batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def axis_rules(rules: Sequence[tuple[str, Any]], mesh: Mesh) -> tuple[tuple[str, Any], ...]:
  """The config's rule table with mesh axes this mesh lacks dropped (lists become tuples).

  So one table serves a ("data",) mesh on a laptop and a data x fsdp x tensor pod.
  """
  out = []
  for name, target in rules:
    targets = tuple(target) if isinstance(target, (list, tuple)) else (target,)
    kept = tuple(t for t in targets if t in mesh.axis_names)
    out.append((str(name), kept if len(kept) > 1 else (kept[0] if kept else None)))
  return tuple(out)


def logical_shardings(mesh: Mesh, rules: Sequence[tuple[str, Any]], boxed_tree: Any) -> Any:
  """NamedShardings for a tree whose leaves carry `nn.with_logical_partitioning` metadata.

  Logical names missing from `rules` are replicated, so a model can name more axes
  than a given config chooses to shard.
  """
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, _complete_rules(rules, specs))


def _complete_rules(rules, specs):
  known = {name for name, _ in rules}
  names = set()
  for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)):
    names.update(n for n in spec if isinstance(n, str))
  return tuple(rules) + tuple((n, None) for n in sorted(names - known))


def follow_param_shardings(tree: Any, abstract_params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for an optimizer state: a leaf whose path ends in a parameter's path and has
  its shape (Adam's `mu/img/.../kernel`) is sharded like that parameter; the rest
  (step counts, empty groups) is replicated."""
  table = {path_str(path): (leaf.shape, sharding) for (path, leaf), sharding in
           zip(jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(param_shardings))}

  def pick(path, leaf):
    keys = path_str(path).split("/")
    for i in range(len(keys)):
      shape, sharding = table.get("/".join(keys[i:]), (None, None))
      if shape == leaf.shape:
        return sharding
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)


def local_rows_start(mesh: Mesh, global_rows: int) -> int:
  """The first row of a `global_rows`-row batch array that this process's slice fills (in
  `global_batch`: one contiguous block per process)."""
  slices = batch_sharding(mesh).addressable_devices_indices_map((global_rows,)).values()
  start, stop = min(s[0].start or 0 for s in slices), max(s[0].stop or global_rows for s in slices)
  if (stop - start) * jax.process_count() != global_rows:
    raise ValueError(f"this process's devices hold rows {start}:{stop} of {global_rows}, not a 1/{jax.process_count()} "
                     f"block of the batch")
  return start


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)
