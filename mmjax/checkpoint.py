"""Orbax checkpoints of the training state and the data iterator, kept in `WORKDIR/checkpoints`.

A checkpoint that is damaged or does not fit the model never loads in part
(tests/test_checkpoint_corruption.py):

- A save cut short (crash, SIGKILL during an asynchronous save) stays in Orbax's temporary
  directory `<step>.orbax-checkpoint-tmp-*`, which no step lists: the trainer resumes from the
  last committed step and warns that it removes the half-written one. Readers (`writer=False`:
  evaluate, export) leave it, as a running trainer may be writing it.
- A committed step with a truncated, missing or unreadable file raises `CheckpointError`
  naming the file (or TensorStore's array and database) and the previous step, to resume
  from once the damaged one is deleted. There is no automatic fall-back: steps are committed
  atomically, so such damage is a storage fault or a partial copy that someone should see;
  every process must make the same choice; and falling back would mean moving the user's
  files, since Orbax refuses to save over a listed step (`StepAlreadyExistsError`) and
  counts it in `keep`.
- A checkpoint whose arrays differ from the configured model's (tree or shapes) raises
  `CheckpointError` listing the paths and both shapes, from the step's metadata before any
  array is read. No earlier step is offered: they all share the mismatch.

The Orbax behaviour this relies on (orbax-checkpoint 0.12):

- `ocp.args.StandardRestore(item, strict=True)`, the default: a stored shape that differs
  from the target's raises instead of being truncated or padded to fit.
- No `partial_restore` (PyTreeRestore's option; StandardRestore leaves it False): a
  checkpoint tree that differs from the target raises instead of restoring the common part.
- `store_array_data_equal_to_fill_value: true`, which Orbax writes into each step's
  `state/_METADATA`: TensorStore then opens the arrays with `fill_missing_data_reads=False`,
  so a missing chunk raises instead of reading as the fill value (zeros).
- Atomic rename on POSIX filesystems (a `commit_success.txt` marker on GCS): only complete
  saves are listed as steps; `cleanup_tmp_directories` removes the rest.
- TensorStore's read errors (`OUT_OF_RANGE`, `DATA_LOSS`, `NOT_FOUND`, ...) arrive as a
  `ValueError`, which Orbax wraps in a bare `Exception`; `restore` unwraps it.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from mmjax.errors import CheckpointError
from mmjax.rules import path_str


class Checkpointer:
  """Saves `{"params", "opt", "step"}` plus the grain iterator state every N steps, keeps the last K."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True, writer: bool = True):
    """`writer=False` for readers of a run that may still be training (evaluate, export)."""
    # Orbax's tensorstore backend rejects relative paths such as `--workdir runs/x`.
    self.directory = epath.Path(workdir).absolute() / "checkpoints"
    # A save cut off by a crash stays in a temporary directory that no step lists; the next
    # run removes it.
    if writer:
      for name in ocp.step.tmp_checkpoints(self.directory):
        warnings.warn(f"removing {self.directory / name}: a save cut short before Orbax committed it; "
                      "the run resumes from the last committed step", stacklevel=2)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=writer,
                                           enable_async_checkpointing=async_save)
    # Handlers named up front, so that a step's metadata can be read before restoring it.
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def path(self, step: int) -> str:
    return str(self.directory / str(step))

  def save(self, step: int, state: Any, data_iterator=None, train_seconds: float | None = None) -> None:
    """`train_seconds`: training time up to `step` over every segment of the run, kept in the
    step's metadata for the next resumed segment to add to."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    metadata = {} if train_seconds is None else {"train_seconds": round(train_seconds, 1)}
    self.manager.save(step, args=ocp.args.Composite(**items), force=True, custom_metadata=metadata)

  def train_seconds(self, step: int) -> float:
    """The training time saved with `step` (0 when it has none)."""
    return float((self.manager.metadata(step).custom_metadata or {}).get("train_seconds", 0.0))

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
    saved = self._read(step, lambda: self.manager.item_metadata(step).get("state"))
    if saved is None:
      raise CheckpointError(f"{self.directory / str(step) / 'state' / '_METADATA'} is missing: step {step} was "
                            f"not saved or copied in full. {self._previous(step)}")
    self._check_fits(step, saved, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state, strict=True)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._read(step, lambda: self.manager.restore(step, args=ocp.args.Composite(**items)))["state"]

  def _read(self, step: int, read: Callable[[], Any]) -> Any:
    """`read()`, raising a file of `step` that cannot be read as a `CheckpointError`."""
    try:
      return read()
    except Exception as e:  # Orbax wraps TensorStore's errors in a bare Exception.
      cause = e
      while cause.__cause__ is not None:
        cause = cause.__cause__
      if not isinstance(cause, (ValueError, OSError)):  # Not the files: out of memory, say.
        raise
      what = str(cause).split(" [tensorstore_spec=")[0]  # TensorStore appends its whole spec.
      raise CheckpointError(f"cannot read {self.path(step)}: a file in it is truncated, missing or corrupt: "
                            f"{what}. {self._previous(step)}") from e

  def _check_fits(self, step: int, saved: Any, abstract_state: Any) -> None:
    """Raises unless the arrays and shapes in `step`'s metadata (`saved`) are `abstract_state`'s."""
    stored, model = ({path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}
                     for tree in (saved, abstract_state))
    differ = sorted(p for p in stored.keys() | model.keys() if stored.get(p) != model.get(p))
    if differ:
      # The parameters' differences, if any: the optimizer state repeats them.
      shown = ([p for p in differ if p.startswith("params/")] or differ)[:12]
      raise CheckpointError(
          f"{self.path(step)} does not fit the configured model: {len(differ)} arrays differ, among them\n"
          + "".join(f"  {p}: checkpoint {stored.get(p, 'absent')}, model {model.get(p, 'absent')}\n" for p in shown)
          + f"Every step in {self.directory} was saved from the model the run started with: resume with "
          "that config, or train this one in a new --workdir.")

  def _previous(self, step: int) -> str:
    """What to do about a damaged `step`: resume from the step before it."""
    earlier = [s for s in self.manager.all_steps() if s < step]
    if not earlier:
      return f"No earlier step is kept: delete {self.path(step)} to start the run afresh."
    return f"Delete {self.path(step)} (or move it out of {self.directory}) to resume from step {max(earlier)}."

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
