"""Orbax checkpoints of the training state and the data iterator, kept in `WORKDIR/checkpoints`."""
from __future__ import annotations

from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from mmjax.errors import CheckpointError


class Checkpointer:
  """Saves `{"params", "opt", "step"}` plus the grain iterator state every N steps, keeps the last K."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    # Orbax's tensorstore backend rejects relative paths such as `--workdir runs/x`.
    self.directory = epath.Path(workdir).absolute() / "checkpoints"
    # A save cut off by a crash stays in a temporary directory that no step lists; the next
    # run removes it.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def path(self, step: int) -> str:
    return str(self.directory / str(step))

  def save(self, step: int, state: Any, data_iterator=None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def has_data_state(self, step: int) -> bool:
    """Whether `step` holds an iterator state for this process under the current process
    count (grain writes `process_<i>-of-<n>.json`); a run restored on another process
    count repositions its iterator from the step instead."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return (self.directory / str(step) / "data" / name).exists()

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """Restores onto `abstract_state`'s shapes and shardings, which may differ from the saving
    run's mesh (Orbax reshards). The iterator, if given, is restored in place; check
    `has_data_state` first."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"cannot restore {self.path(step)} onto the configured model: {e}") from e
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
