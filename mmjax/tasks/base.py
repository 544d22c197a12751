"""What the trainer asks of a task: `Task`, a protocol, with its optional hooks written out.

A task is built as `Task(config, mesh)` and owns the model (`model`, built from `model_config`
by `mmjax.models.build`), its tokenizer, the loss and the evals. The trainer
(`mmjax.train`) calls the required methods; the hooks have defaults here, so a task class
that subclasses `Task` overrides only what it needs.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol

import jax
import ml_collections
import numpy as np

from mmjax.config import as_dict
from mmjax.data import pipeline


def benchmark_entries(evals) -> Iterator[tuple[str, str, str, dict]]:
  """`(name, benchmark, data, options)` of each `evals.<name>` entry that names a benchmark on files
  (`benchmark=...`, `data=...`, the benchmark's options beside them); entries whose `data` is "" are
  slots left for the user to fill, and skipped."""
  for name, entry in evals.items():
    if isinstance(entry, ml_collections.ConfigDict) and "benchmark" in entry and entry.get("data"):
      options = {k: v for k, v in as_dict(entry).items() if k not in ("benchmark", "data")}
      yield name, entry.benchmark, entry.data, options


def shapes_evals(evals, names: tuple[str, ...]) -> list[str]:
  """The entries among `names` in `evals` that are the synthetic data's own evals (not benchmarks)."""
  return [name for name in names if name in evals and "benchmark" not in evals[name]]


class Task(Protocol):
  model: Any
  model_config: dict[str, Any]  # Resolved (tokenizer ids filled in): `mmjax.models.build` builds `model` from it.
  tokenizer: Any  # None for image-only tasks.
  max_len: int | None

  def __init__(self, config, mesh): ...

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    """A batch of `batch_size` rows with the shapes and dtypes of a training batch."""
    ...

  def init(self, rng, batch) -> Any:
    """The model's boxed (logically annotated) parameters."""
    ...

  def loss_fn(self, params, batch, rng, train: bool = True) -> tuple[jax.Array, dict]:
    ...

  def evaluate(self, params) -> dict[str, float]:
    ...

  # Optional hooks.
  def source(self, data_config):
    """The training source; `data.source` names it unless the task supplies its own."""
    return pipeline.make_source(data_config)

  def data_ops(self) -> list | None:
    """Per-record grain operations that replace the loader's default image/caption ops."""
    return None

  def teacher(self) -> tuple[str, float] | None:
    """`(subtree, decay)` when the task distils from a teacher: the trainer keeps `state["teacher"]`, an
    exponential moving average of `params[subtree]` with this decay, and passes it and the step to
    `loss_fn(params, batch, rng, teacher=..., step=...)`."""
    return None

  def for_export(self, params) -> tuple[dict[str, Any], Any]:
    """The model config and parameters an export keeps (a training-only part may go)."""
    return self.model_config, params

  def prepare_batch(self, local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's rows, reshaped on the host before they become a global batch."""
    return local
