"""Compile a recipe's training step for a TPU slice, or lower it for GPUs, from any machine.

  python -m mmjax.compile --config configs/siglip_b16.py --topology v5e:2x2 \
      --config.model.attention_impl=pallas
  python -m mmjax.compile --config configs/siglip_b16.py --platform cuda --num_devices 8

The step is the one `python -m mmjax.train` runs (`runs.lower_train_step`: the same task,
mesh, logical rules, state shardings and global batch), on a mesh of the slice's device
descriptions; a `-1` mesh axis takes the slice's chips. TPU needs libtpu (`pip install -e
.[tpu]`), which compiles for the slice on this host: nothing is downloaded and no TPU is used.

It prints per-device HBM (parameters + optimizer state, batch, temporaries), whether that fits
the chip, FLOPs per step, compile seconds and a roofline estimate of step time and MFU, and
exits with status 1 and what to change when the step does not compile or does not fit.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from mmjax import cli, parallel
from mmjax.errors import ConfigError, MMJaxError
from mmjax.runs import lower_train_step, resolve_batch_size


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures from the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4,
  /v5e, /v5p, /v6e): HBM capacity, peak bf16 matmul throughput and HBM bandwidth."""
  name: str
  hbm_gib: float
  bf16_tflops: float
  hbm_gbps: float


CHIPS = {"v4": Chip("TPU v4", 32, 275, 1200), "v5e": Chip("TPU v5e", 16, 197, 819),
         "v5p": Chip("TPU v5p", 95, 459, 2765), "v6e": Chip("TPU v6e", 32, 918, 1640)}
_CHIPS_PER_HOST = (2, 2, 1)  # Every generation above has hosts of 2x2 chips (and larger ones).
_GIB = 2 ** 30
# Under a mesh of several devices JAX's cuDNN attention stays a custom-partitioned op until it is
# compiled for the GPUs, so it is counted as such there.
_GPU_ATTENTION_CALLS = {"triton": "__gpu$xla.gpu.triton", "cudnn": "__cudnn$fmha", "mosaic_gpu": "mosaic_gpu",
                        "custom_partitioned": "CustomSPMDPartitioning"}


class CompileError(MMJaxError, RuntimeError):
  """The step does not compile for the target, or does not fit its memory."""


def topology_devices(topology: str):
  """`(chip, devices)` of a slice named like `v5e:16x16` or `v5p:4x4x8`: device descriptions
  that `jax.jit(...).lower(...).compile()` builds real TPU executables for."""
  from jax.experimental import topologies  # Imported here: it needs libtpu only when used.
  generation, _, shape = topology.partition(":")
  if generation not in CHIPS or not re.fullmatch(r"\d+(x\d+){1,2}", shape):
    raise ConfigError(f"--topology={topology!r}: expected <generation>:<AxB[xC]> with a generation in "
                      f"{sorted(CHIPS)}, e.g. v5e:2x2, v5e:16x16, v5p:4x4x4")
  dims = [int(d) for d in shape.split("x")]
  bounds = tuple(min(b, d) for b, d in zip(_CHIPS_PER_HOST, dims + [1] * (3 - len(dims))))
  # libtpu takes a lock file per process; compiling needs no TPU, so several may load it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                        chips_per_host_bounds=bounds, num_slices=1)
  except (RuntimeError, ValueError) as e:
    raise ConfigError(f"--topology={topology!r}: libtpu cannot describe it ({str(e).splitlines()[0]}). "
                      "Install the TPU extra: pip install -e '.[tpu]'") from e
  return CHIPS[generation], list(desc.devices)


def counting_config(config: ml_collections.ConfigDict, *, remat: bool) -> ml_collections.ConfigDict:
  """`config` with every layer stack unrolled and attention on the `xla` path (and, unless
  `remat`, no rematerialisation): XLA's cost analysis counts a scanned body once, and a
  kernel's custom call not at all, so FLOPs are counted on this program instead."""
  counted = ml_collections.ConfigDict(config.to_dict())

  def edit(node):
    for key in list(node.keys()):
      value = node[key]
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        edit(value)
      elif key == "scan":
        node[key] = False
      elif key == "attention_impl":
        node[key] = "xla"
      elif key == "remat_policy" and not remat:
        node[key] = "none"

  edit(counted)
  return counted


def step_flops(config: ml_collections.ConfigDict, *, remat: bool) -> float:
  """FLOPs of one training step at the global batch (XLA's count of the unrolled program,
  lowered for one host CPU device: nothing is compiled)."""
  counted = counting_config(config, remat=remat)
  counted.mesh = tuple((name, 1) for name, _ in config.mesh)
  counted.data.per_device_batch_size = 0  # `config`'s batch_size is already the global one.
  mesh = parallel.make_mesh(counted.mesh, devices=jax.devices("cpu")[:1])
  with parallel.compile_for("cpu"):
    lowered, _ = lower_train_step(counted, mesh)
  return float(lowered.cost_analysis()["flops"])


def _device_bytes(abstract_tree) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract_tree))


def _advice(config, batch: int) -> str:
  """What to change, for `config` (as given) whose step has the global batch `batch`."""
  per_device = config.data.get("per_device_batch_size", 0)
  batch_key = (f"--config.data.per_device_batch_size, now {per_device}" if per_device else
               f"--config.data.batch_size, now {batch} in all")
  return ("Change one of: a larger fsdp axis (--config.mesh, now "
          f"{tuple(tuple(a) for a in config.mesh)}); model.*.remat_policy='full' (or 'dots_no_batch'); a smaller "
          f"per-device batch ({batch_key}); "
          f"--config.model.attention_impl (now {config.model.get('attention_impl', 'xla')!r}).")


def compile_tpu(config: ml_collections.ConfigDict, topology: str, *, count_flops: bool = True) -> dict[str, Any]:
  """Compiles `config`'s training step for `topology` and returns the report's fields.

  Raises CompileError (with what to change) when XLA cannot compile it or it does not fit HBM."""
  chip, devices = topology_devices(topology)
  mesh = parallel.make_mesh(config.mesh, devices=devices)
  given, config = config, resolve_batch_size(config, mesh)
  start = time.perf_counter()
  lowered, abstract = lower_train_step(config, mesh)
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA raises its runtime error type, which differs across jax versions.
    first = str(e).strip().splitlines()[0][:500]
    kind = "does not fit" if "RESOURCE_EXHAUSTED" in str(e) else "does not compile"
    raise CompileError(f"the training step {kind} for {topology}: {first}\n"
                       f"{_advice(given, config.data.batch_size)}") from e
  compile_s = time.perf_counter() - start
  memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
  # libtpu describes a v4 chip as two devices (one per TensorCore); v5e, v5p and v6e as one.
  share = len(devices) / math.prod(int(d) for d in topology.partition(":")[2].split("x"))
  hbm = chip.hbm_gib * _GIB / share
  state = _device_bytes(abstract)
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
           + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
  report = {"topology": topology, "chip": chip.name, "devices": len(devices), "mesh": dict(mesh.shape),
            "attention": config.model.get("attention_impl", "xla"), "batch": config.data.batch_size,
            "state_gib": state / _GIB, "batch_gib": (memory.argument_size_in_bytes - state) / _GIB,
            "temp_gib": memory.temp_size_in_bytes / _GIB, "total_gib": total / _GIB, "hbm_gib": hbm / _GIB,
            "fits": total <= hbm, "compile_s": compile_s,
            "kernel_calls": lowered.as_text().count("custom_call @tpu_custom_call")}
  if count_flops:
    report.update(roofline(config, chip, len(devices), share, float(cost.get("flops", 0.0)),
                           float(cost.get("bytes accessed", 0.0))))
  return report


def roofline(config, chip: Chip, devices: int, share: float, compiled_flops: float, compiled_bytes: float) -> dict:
  """A roofline estimate: step time = max(executed FLOPs / peak, HBM bytes / bandwidth) per device.

  Executed FLOPs include rematerialisation; MFU counts the model's FLOPs (no remat). The TPU
  executable's byte count sees a scanned body once, so it is scaled by the ratio of executed to
  compiled FLOPs (bytes assumed to scale like FLOPs). An estimate: no overlap, launch or
  communication costs."""
  executed = step_flops(config, remat=True) / devices
  model = step_flops(config, remat=False) / devices
  peak = chip.bf16_tflops * 1e12 / share
  hbm_bytes = compiled_bytes * max(1.0, executed / compiled_flops) if compiled_flops else compiled_bytes
  step_s = max(executed / peak, hbm_bytes / (chip.hbm_gbps * 1e9 / share))
  return {"gflops": model / 1e9, "executed_gflops": executed / 1e9, "step_s": step_s,
          "mfu": model / (step_s * peak) if step_s else 0.0,
          "roofline_figures": f"{chip.bf16_tflops:g} TFLOP/s bf16 and {chip.hbm_gbps:g} GB/s HBM per chip "
                              f"(Cloud TPU {chip.name} system architecture page)"}


def lower_gpu(config: ml_collections.ConfigDict, gpu: str = "NVIDIA H100", devices=None) -> dict[str, Any]:
  """Lowers `config`'s step for CUDA GPUs of kind `gpu`, with this host's devices (or `devices`)
  standing in for them, and counts the attention kernels' custom calls in the program
  (compiling needs a GPU)."""
  mesh = parallel.make_mesh(config.mesh, devices=devices)
  start = time.perf_counter()
  try:
    lowered, _ = lower_train_step(config, mesh, platform="cuda", device_kind=gpu)
  except RuntimeError as e:
    if "cuDNN is not detected" not in str(e):
      raise
    raise CompileError("attention_impl='cudnn' lowers only where jaxlib can report the cuDNN version (a GPU "
                       "host, or jax[cuda12] installed); here, lower with attention_impl='pallas' or 'xla'") from e
  text = lowered.as_text()
  calls = {name: text.count(f"custom_call @{target}") for name, target in _GPU_ATTENTION_CALLS.items()}
  return {"platform": "cuda", "gpu": gpu, "devices": mesh.size, "mesh": dict(mesh.shape),
          "attention": config.model.get("attention_impl", "xla"), "lower_s": time.perf_counter() - start,
          "custom_calls": calls}


def report_table(report: dict[str, Any]) -> str:
  """The report as `key  value` lines, sizes in GiB."""
  def show(key, value):
    if key == "fits":
      return f"{'yes' if value else 'NO'} ({report['total_gib']:.2f} of {report['hbm_gib']:.2f} GiB per device)"
    if key == "mfu":
      return f"{value:.1%} (roofline estimate)"
    if key == "step_s":
      return f"{value:.3f} (roofline estimate)"
    return f"{value:.4g}" if isinstance(value, float) else str(value)

  names = {"state_gib": "params + optimizer GiB/device", "batch_gib": "batch GiB/device",
           "temp_gib": "temporaries GiB/device", "total_gib": "total GiB/device", "hbm_gib": "HBM GiB/device",
           "gflops": "model GFLOPs/device/step", "executed_gflops": "executed GFLOPs/device/step",
           "step_s": "step s", "mfu": "MFU", "compile_s": "compile s", "lower_s": "lower s",
           "kernel_calls": "Pallas TPU kernel calls", "roofline_figures": "roofline assumes"}
  width = max(len(names.get(k, k)) for k in report)
  return "\n".join(f"{names.get(k, k):<{width}}  {show(k, v)}" for k, v in report.items())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  config, report = f.config, {}
  try:
    if f.platform == "tpu":
      if not f.topology:
        raise ConfigError("--topology is required for --platform=tpu (e.g. v5e:2x2)")
      report = compile_tpu(config, f.topology, count_flops=f.count_flops)
      print(report_table(report))
      if not report["fits"]:
        raise CompileError(f"the training step does not fit {report['chip']} HBM on {f.topology}: "
                           f"{report['total_gib']:.2f} GiB per device > {report['hbm_gib']:.2f}.\n"
                           f"{_advice(config, report['batch'])}")
    else:
      report = lower_gpu(config, f.gpu)
      print(report_table(report))
  except MMJaxError as e:
    print(f"error: {type(e).__name__}: {e}", flush=True)
    _write_json(f.json, {**report, "error": f"{type(e).__name__}: {e}"})
    raise SystemExit(1)
  _write_json(f.json, report)


def _write_json(path: str | None, report: dict):
  if path:
    with open(path, "w", encoding="utf-8") as out:
      json.dump(report, out, indent=2, default=str)


if __name__ == "__main__":
  # The host compiles for the target: JAX needs only its CPU backend here (and libtpu's
  # compiler, which `topology_devices` loads without claiming a TPU).
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  config_flags.DEFINE_config_file("config", None, "Recipe: a shipped recipe's name (siglip_shapes) or a file, path/to/recipe.py[:arg].", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice, <generation>:<shape>, e.g. v5e:2x2, v5e:16x16, v5p:4x4x4.")
  flags.DEFINE_enum("platform", "tpu", ["tpu", "cuda"], "tpu: compile for --topology; cuda: lower for GPUs.")
  flags.DEFINE_integer("num_devices", None, "--platform=cuda: how many GPUs the mesh spans (host CPU devices "
                       "stand in for them while lowering).")
  flags.DEFINE_string("gpu", "NVIDIA H100", "--platform=cuda: the GPU kind Pallas's Triton lowering targets.")
  flags.DEFINE_string("json", None, "Also write the report (or the error) to this JSON file.")
  flags.DEFINE_bool("count_flops", True, "Count FLOPs on the unrolled program for the roofline estimate.")
  flags.mark_flags_as_required(["config"])

  def set_devices(argv):
    if flags.FLAGS.num_devices:
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_force_host_platform_device_count={flags.FLAGS.num_devices}").strip()
    main(argv)

  cli.run(set_devices)
