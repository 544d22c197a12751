"""What each SigLIP 2 loss costs per training step: `configs/siglip2_shapes.py` with the sigmoid loss
alone, with LocCa's decoder, and with self-distillation and masked prediction switched on (as in the
recipe's last fraction of training), timed side by side in alternating rounds on one batch.

  python benchmarks/siglip2_losses.py                # the recipe's batch of 128
  python benchmarks/siglip2_losses.py --rounds 6 --steps 5
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

from mmjax import parallel, runs, runtime  # noqa: E402
from mmjax.config import load  # noqa: E402
from mmjax.data import pipeline  # noqa: E402

VARIANTS = {"sigmoid": "locca=False,distill=False", "+ LocCa": "distill=False", "+ distillation (on)": ""}


class Step:
  """The trainer's jitted step of one variant on one of its own batches, state donated each step."""

  def __init__(self, arg: str):
    config = load(f"configs/siglip2_shapes.py:{arg}" if arg else "configs/siglip2_shapes.py")
    config.loss.distill.start = 0.0  # Distillation from the first step: the cost of its part of the run.
    config, self.mesh, rules, task = runs.setup(config)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(rules):
      abstract, shardings, tx, lr, init = runs.sharded_state(task, config, self.mesh, rules)
      self.state = init(jax.random.key(0))
      loader = pipeline.Loader(task.source(config.data), tokenizer=task.tokenizer, image_size=config.data.image_size,
                               max_len=task.max_len, global_batch_size=config.data.batch_size, seed=config.seed,
                               ops=task.data_ops())
      local = next(iter(loader))
      local.pop(pipeline.SKIPPED)
      self.batch = parallel.global_batch(task.prepare_batch(local), self.mesh)
      self.step = runs.make_train_step(task, tx, lr, shardings, self.mesh)
      self.state, metrics = self.step(self.state, self.batch, jax.random.key(1))  # Compiles.
      jax.block_until_ready(metrics)

  def __call__(self, n: int) -> float:
    with jax.set_mesh(self.mesh):
      t0 = time.perf_counter()
      for _ in range(n):
        self.state, metrics = self.step(self.state, self.batch, jax.random.key(1))
      jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / n


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--steps", type=int, default=5, help="Steps per variant per round.")
  args = parser.parse_args()
  runtime.tune_cpu_runtime()
  steps = {name: Step(arg) for name, arg in VARIANTS.items()}
  times = {name: [] for name in steps}
  for _ in range(args.rounds):
    for name, step in steps.items():
      times[name].append(step(args.steps))
  base = min(times["sigmoid"])
  print(f"{'variant':<22} {'s/step (best)':>14} {'x sigmoid':>10}")
  for name, ts in times.items():
    print(f"{name:<22} {min(ts):>14.3f} {min(ts) / base:>10.2f}")
  print(f"device: {jax.devices()[0].device_kind}, {args.rounds} rounds of {args.steps} steps")


if __name__ == "__main__":
  main()
