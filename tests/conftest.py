import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The tests run on the CPU backend (subprocesses inherit it). With libtpu installed (the `tpu` extra) jax
# would otherwise try to start a TPU at every backend creation, and print warnings on a host without one;
# compiling for a TPU topology (jax.experimental.topologies) still works. JAX_PLATFORMS= (empty) or
# JAX_PLATFORMS=tpu overrides. libtpu also takes a host-wide lock (/tmp/libtpu_lockfile) for the life of
# the first process that loads it, which would fail the TPU-topology compiles in every other pytest-xdist
# worker or concurrent test run; on the CPU backend no process opens a TPU, so the lock is not needed.
# One persistent compilation cache for the whole run, in the checkout (every pytest-xdist worker and every
# subprocess a test starts share it): a program compiled again, by a resumed run or another test, loads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
                                   "jax_compilation_cache"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] == "cpu":
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: starts real processes or trains for long; kept in CI because "
                                     "it is what proves a feature")
