"""What every `python -m mmjax.<command>` shares: `--config` takes a shipped recipe's name or any
recipe file from any directory, and a user's error (a bad flag, config key or file, or any
`MMJaxError` the run raises) prints one line, `error: ...`, and exits non-zero: 2 for flags and
config, 1 for the run's own errors. `--verbose` shows the traceback instead. absl commands go
through `run`; argparse ones wrap their work in `user_errors` and take `add_verbose_flag`."""
from __future__ import annotations

import contextlib
import difflib
import re
import sys

from absl import app, flags
import jax
import ml_collections

from mmjax import config as mmjax_config, parallel
from mmjax.errors import ConfigError, MMJaxError

USAGE_ERROR, RUN_ERROR = 2, 1
_OVERRIDE = re.compile(r"--(?:no)?config\.([^=]+)(?:=.*)?")


def run(main) -> None:
  """`absl.app.run(main)` with recipes resolved and user errors reported as one line."""
  flags.DEFINE_bool("verbose", False, "On an error, print the full traceback, not only its line.")

  def guarded(argv):
    with user_errors(flags.FLAGS.verbose):
      return main(argv)

  app.run(guarded, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
  """Parses `argv` into absl's FLAGS: `--config NAME[:arg]` becomes the recipe's path, and each
  `--config.a.b=v` must name an existing key (with a "did you mean" hint) before ml_collections
  sees it. The recipe is loaded here, so its errors are reported before anything runs."""
  try:
    argv = list(argv)
    spec_at = _config_value_index(argv)
    if spec_at is not None:
      spec = argv[spec_at].partition("=")[2] if argv[spec_at].startswith("--config=") else argv[spec_at]
      path, colon, arg = spec.partition(":")
      resolved = mmjax_config.recipe_path(path) + colon + arg
      argv[spec_at] = f"--config={resolved}" if argv[spec_at].startswith("--config=") else resolved
      config = mmjax_config.load(resolved)
      for item in argv[1:]:
        match = _OVERRIDE.fullmatch(item)
        if match:
          check_key(config, match.group(1))
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      flags.FLAGS.config  # pylint: disable=pointless-statement  # ml_collections loads it lazily: load it now.
    return rest
  except Exception as e:  # pylint: disable=broad-except  # Every parse error is the user's input.
    if "--verbose" in argv:
      raise
    fail(one_line(e), USAGE_ERROR)


def check_key(config: ml_collections.ConfigDict, dotted: str) -> None:
  """Raises ConfigError unless `config.<dotted>` exists, naming the nearest key."""
  node, path = config, "config"
  for key in dotted.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      return  # A leaf's own structure (a tuple, a string) is ml_collections' to parse.
    if key not in node:
      keys = sorted(node.keys())
      close = difflib.get_close_matches(key, keys, n=1)
      hint = f"did you mean {close[0]}?" if close else f"its keys are {', '.join(keys)}"
      raise ConfigError(f"--config.{dotted}: {path} has no key {key!r}; {hint}")
    node, path = node[key], f"{path}.{key}"


@contextlib.contextmanager
def user_errors(verbose: bool):
  """Reports an MMJaxError raised inside as one line and exits 1, a UsageError likewise with 2
  (re-raises either when `verbose`)."""
  try:
    yield
  except app.UsageError as e:
    if verbose:
      raise
    fail(one_line(e), USAGE_ERROR)
  except MMJaxError as e:
    if verbose:
      raise
    # Every process of a multi-process run reports its own error, so say which one this is.
    where = (f"process {jax.process_index()} of {jax.process_count()}: "
             if jax.distributed.is_initialized() and jax.process_count() > 1 else "")
    fail(f"{where}{type(e).__name__}: {one_line(e)}", RUN_ERROR)


def define_process_flags() -> None:
  """`--coordinator_address`, `--num_processes` and `--process_id`: joining a multi-process run
  outside SLURM or TPU pods, which `join_processes` does."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs "
                      "outside SLURM or TPU pods (see mmjax.parallel.initialize).")
  flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")


def join_processes() -> bool:
  """`parallel.initialize` with the flags of `define_process_flags` (or the cluster's environment)."""
  f = flags.FLAGS
  return parallel.initialize(f.coordinator_address, f.num_processes, f.process_id)


def add_verbose_flag(parser) -> None:
  """`--verbose` for the argparse commands (`mmjax.convert_checkpoint`, `mmjax.data.*`), which run
  their work inside `user_errors(args.verbose)`."""
  parser.add_argument("--verbose", action="store_true", help="on an error, print the full traceback")


def one_line(error: BaseException) -> str:
  """An exception's message on one line: ml_collections' escaped, multi-line messages unfolded."""
  text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
  if isinstance(error, (KeyError, AttributeError)) and text.startswith("'") and "\n" in text:
    text = text.strip("'").replace("\\'", "'").replace("\\n", "\n")
  return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__


def fail(message: str, status: int) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _config_value_index(argv: list[str]) -> int | None:
  """The index in `argv` of `--config`'s value (`--config=X` itself, or the word after `--config`)."""
  for i, item in enumerate(argv[1:], start=1):
    if item.startswith("--config="):
      return i
    if item == "--config" and i + 1 < len(argv):
      return i + 1
  return None


