"""Kill/restart trials (tests/fault_injection.py): a run killed with SIGKILL during a step or
during an asynchronous checkpoint save, or stopped by SIGTERM, resumes to bit-identical
parameters; no checkpoint on disk is corrupt."""
import random
import re

import jax
import numpy as np
import pytest

from tests import fault_injection

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  fault_injection.finish(workdir)
  return fault_injection.params(workdir)


@pytest.mark.parametrize("kind", fault_injection.KINDS)
def test_interrupted_run_resumes_bit_identically(kind, reference, tmp_path):
  outcome = fault_injection.trial(kind, str(tmp_path), random.Random(kind), max_delay=0.3)
  assert outcome["interrupted"], "the run finished before the signal; raise STEPS"
  if kind == "sigterm":
    assert outcome["returncode"] == 143
    stopped = int(re.search(r"stopped at step (\d+)", outcome["stderr"]).group(1))
    assert stopped in outcome["committed"]  # The final checkpoint was written before exiting.
  else:
    assert outcome["returncode"] == -9
  if kind == "save":  # Killed while writing: a half-written save was on disk, and no step listed it.
    assert outcome["half_written"] and all(str(s) in outcome["on_disk"] for s in outcome["committed"])
  assert outcome["left_over"] == []  # The restarted run removed half-written saves.
  for got, want in zip(jax.tree.leaves(fault_injection.params(str(tmp_path))), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(got, want)
