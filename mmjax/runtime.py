"""How a process starts: host memory and XLA:CPU scheduling for CPU runs, and quiet library logs.

Entry points (`train`, `evaluate`, `export`, `retrieve`, the throughput benchmark) call these
before JAX creates its backend; nothing here decides parallelism (that is `mmjax.parallel`).
"""
from __future__ import annotations

import ctypes
import os
import sys

from absl import flags, logging

# glibc mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def reuse_freed_host_memory() -> bool:
  """Makes glibc keep freed memory for reuse instead of returning it to the kernel.

  XLA's CPU runtime allocates a step's temporaries (GiBs for a ViT-B step) from its worker
  threads; glibc serves such blocks with a fresh `mmap` and `munmap`s them after the step,
  so every step page-faults all of its temporary memory again (`benchmarks/RESULTS.md`
  has the measurements). One arena without `mmap`
  and without trimming reuses the same pages. Call before JAX starts its threads; returns
  False where the C library is not glibc.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: SIZE_MAX, never trim
  return all(mallopt(param, value) == 1 for param, value in settings)


_CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def prefer_sequential_cpu_schedule() -> bool:
  """Turns XLA:CPU's concurrency-optimised scheduler off, unless XLA_FLAGS already sets it.

  That scheduler orders a step so that independent ops (a CLIP's two towers) run at the same
  time; on a few cores their matmuls then contend for the same cores and caches (measured in
  `benchmarks/RESULTS.md`). Call
  before JAX creates its CPU backend; returns whether the flag was added.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if _CPU_SCHEDULER_FLAG in flags:
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {_CPU_SCHEDULER_FLAG}=false".strip()
  return True


def tune_cpu_runtime() -> dict[str, bool]:
  """`reuse_freed_host_memory` and `prefer_sequential_cpu_schedule`, as the trainer, the
  evaluator and the throughput benchmark start; returns which of them took effect."""
  return {"host_memory_reuse": reuse_freed_host_memory(), "sequential_schedule": prefer_sequential_cpu_schedule()}


def quiet_logs():
  """Orbax and grain log every save at INFO; keep the progress line readable unless asked."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
