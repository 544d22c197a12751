import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: starts real processes or trains for long; kept in CI because "
                                     "it is what proves a feature")
