"""Base-to-novel table: zero-shot, linear probe, CoOp, CoCoOp, MaPLe, CoPrompt on a frozen two-tower.

Every prompt method trains with `mmjax.train` from the recipe (default `configs/prompt_shapes.py`,
whose backbone is the run of `make train`), once per shot seed; runs are kept under --workdir, so
a rerun reads finished ones back. Prints method x base / novel / HM / trainable parameters /
seconds per run (means over seeds) and writes JSON.

  python benchmarks/adapt_table.py --workdir runs/base_to_novel
  python benchmarks/adapt_table.py --image_folder /data/flowers --workdir runs/b2n_flowers
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import config as mmjax_config  # noqa: E402
from mmjax.adapt import base_to_novel  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/prompt_shapes.py")
  parser.add_argument("--workdir", default="runs/base_to_novel")
  parser.add_argument("--methods", default=",".join(base_to_novel.METHODS))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--image_folder", default="", help="An ImageFolder tree (root/<class>/<image>) "
                      "instead of the shapes classes.")
  parser.add_argument("--shots", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None, help="Training steps per prompt run.")
  parser.add_argument("--out", default="benchmarks/adapt_table.json")
  args = parser.parse_args()

  def config_for(method):
    config = mmjax_config.load(f"{args.config}:{method}")
    if args.image_folder:
      config.data.source, config.data.image_root = "image_folder", args.image_folder
    if args.shots:
      config.data.shots = args.shots
    if args.steps:
      config.total_steps = config.eval_every = config.checkpoint_every = args.steps
    return config

  results = base_to_novel.run(config_for, args.workdir, args.methods.split(","),
                              [int(s) for s in args.seeds.split(",")])
  config = config_for("coop")
  print(f"base-to-novel, {config.data.shots} shots, seeds {args.seeds} ({config.data.source})")
  print(base_to_novel.table(results))
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"data": config.data.to_dict(), "steps": config.total_steps, "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
