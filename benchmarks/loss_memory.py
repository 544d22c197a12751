"""Per-device temporary memory of the sigmoid loss (value and gradients) per implementation.

Compiles, never runs, `value_and_grad` of `mmjax.losses.sigmoid_loss` on meshes of 1..8
fake CPU devices with b rows per device and reads XLA's memory analysis. Ring should stay
flat in D; all_gather and dense grow with D.

  python benchmarks/loss_memory.py --per_device_batch 1024 --dim 256 --devices 1,2,4,8
"""
import argparse
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from mmjax import losses, parallel  # noqa: E402

IMPLS = ("ring", "all_gather", "dense")
MIB = 2 ** 20


def temp_bytes(impl, num_devices, per_device_batch, dim):
  mesh = parallel.make_mesh((("data", num_devices),), devices=jax.devices()[:num_devices])
  emb = jax.ShapeDtypeStruct((per_device_batch * num_devices, dim), jnp.float32,
                             sharding=NamedSharding(mesh, P(parallel.batch_axes(mesh))))
  scalar = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=NamedSharding(mesh, P()))
  loss = lambda x, y, t, b: losses.sigmoid_loss(x, y, t, b, mesh=mesh, impl=impl)
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  return step.lower(emb, emb, scalar, scalar).compile().memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--per_device_batch", type=int, default=1024)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--out", default="benchmarks/loss_memory.json")
  args = parser.parse_args()

  rows = []
  for num_devices in [int(d) for d in args.devices.split(",")]:
    row = {"devices": num_devices, "global_batch": args.per_device_batch * num_devices}
    for impl in IMPLS:
      row[impl] = temp_bytes(impl, num_devices, args.per_device_batch, args.dim)
    rows.append(row)

  print(f"Per-device temp memory of value_and_grad(sigmoid_loss), MiB "
        f"(b={args.per_device_batch}, dim={args.dim}, float32)\n")
  print("| D | global B | " + " | ".join(IMPLS) + " | ring / all_gather |")
  print("|---|---|" + "---|" * (len(IMPLS) + 1))
  for row in rows:
    cells = " | ".join(f"{row[impl] / MIB:.2f}" for impl in IMPLS)
    print(f"| {row['devices']} | {row['global_batch']} | {cells} | "
          f"{row['ring'] / row['all_gather']:.3f} |")

  with open(args.out, "w") as f:
    json.dump({"per_device_batch": args.per_device_batch, "dim": args.dim,
               "dtype": "float32", "backend": jax.default_backend(),
               "jax_version": jax.__version__, "temp_size_in_bytes": rows}, f, indent=2)


if __name__ == "__main__":
  main()
