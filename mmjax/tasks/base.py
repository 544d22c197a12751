"""What the trainer asks of a task: `Task`, a protocol, with its optional hooks written out.

A task is built as `Task(config, mesh)` and owns the model (`model`, built from `model_config`
by `mmjax.models.build`), its tokenizer, the loss and the evals. The trainer
(`mmjax.train`) calls the required methods; the hooks have defaults here, so a task class
that subclasses `Task` overrides only what it needs.
"""
from __future__ import annotations

from typing import Any, Protocol

import jax
import numpy as np

from mmjax.data import pipeline


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

  def prepare_batch(self, local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's rows, reshaped on the host before they become a global batch."""
    return local
