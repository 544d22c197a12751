"""`make train` over several seeds, as a table with the mean and range (README "Results").

  python benchmarks/seeds.py                            # seeds 0, 1, 2 of configs/siglip_shapes.py
  python benchmarks/seeds.py --seeds 3 4 -- --config.total_steps=1000

Each seed is one `python -m mmjax.train` process with `--config.seed=S --config.data.seed=S` in
`WORKDIR/seed<S>`, timed from start to exit; run it with nothing else on the machine for the wall
clock to mean anything. A finished seed is read back from its summary, with its wall clock, so a
rerun only trains the seeds that are missing. Arguments after `--` go to every training process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = (("zero-shot seen", "zeroshot/acc_seen"), ("zero-shot held-out", "zeroshot/acc_held_out"),
           ("i2t R@1", "retrieval/i2t_r1"), ("t2i R@1", "retrieval/t2i_r1"), ("binding", "binding/acc"))
WALL_FILE = "wall_seconds.json"


def run_seed(config: str, seed: int, workdir: str, overrides: list[str]) -> dict:
  """The seed's summary plus `wall_seconds`, training it first unless its workdir has both."""
  summary_path, wall_path = os.path.join(workdir, "summary.json"), os.path.join(workdir, WALL_FILE)
  if not (os.path.exists(summary_path) and os.path.exists(wall_path)):
    cmd = [sys.executable, "-m", "mmjax.train", "--config", config, "--workdir", workdir,
           f"--config.seed={seed}", f"--config.data.seed={seed}", *overrides]
    print(" ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    with open(wall_path, "w", encoding="utf-8") as f:
      json.dump({"wall_seconds": round(time.perf_counter() - start, 1)}, f)
  with open(summary_path, encoding="utf-8") as f, open(wall_path, encoding="utf-8") as g:
    return {**json.load(f), **json.load(g)}


def table(results: dict[int, dict]) -> str:
  keys = [("wall s", "wall_seconds"), ("train s", "train_seconds"), *COLUMNS]
  keys = [(name, key) for name, key in keys if all(key in r for r in results.values())]
  rows = [f"| seed | {' | '.join(name for name, _ in keys)} |", "|---" * (len(keys) + 1) + "|"]
  for seed, r in results.items():
    rows.append(f"| {seed} | " + " | ".join(_fmt(r[key]) for _, key in keys) + " |")
  values = {key: np.array([r[key] for r in results.values()], float) for _, key in keys}
  rows.append(f"| mean of {len(results)} | " + " | ".join(_fmt(values[key].mean()) for _, key in keys) + " |")
  rows.append("| range | " + " | ".join(f"{_fmt(values[key].min())} – {_fmt(values[key].max())}"
                                        for _, key in keys) + " |")
  return "\n".join(rows)


def _fmt(value: float) -> str:
  return f"{value:.3f}" if abs(value) < 10 else f"{value:.0f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/siglip_shapes.py")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--workdir", default="runs/seeds")
  parser.add_argument("overrides", nargs="*", help="after --: flags for every training process")
  args = parser.parse_args()
  workdir = os.path.abspath(args.workdir)
  results = {seed: run_seed(args.config, seed, os.path.join(workdir, f"seed{seed}"), args.overrides)
             for seed in args.seeds}
  print(f"\n{args.config} {' '.join(args.overrides)}\n{table(results)}")


if __name__ == "__main__":
  main()
