"""The tests' tiny recipe as a config file, for tests that start `python -m mmjax.train`.

  python -m mmjax.train --config tests/tiny_config.py:2x4 --workdir /tmp/run

The argument `DxF` sets the mesh to D-way `data` by F-way `fsdp`.
"""
from tests.helpers import tiny_config


def get_config(arg="8x1"):
  data, fsdp = (int(n) for n in arg.split("x"))
  return tiny_config(mesh=(("data", data), ("fsdp", fsdp), ("tensor", 1)))
