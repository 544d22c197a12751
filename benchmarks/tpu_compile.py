"""The scale recipes compiled for real TPU slices from this CPU host (`mmjax.compile`), as a table.

  python benchmarks/tpu_compile.py                      # every recipe x slice x attention
  python benchmarks/tpu_compile.py --recipes siglip_b16 --slices v5e:2x2 --attention pallas

Each row is one `python -m mmjax.compile` process (a few CPU-minutes for a ViT-B/16 step), so
the table is a benchmark, not a test. Rows append to `--out` (JSON lines) as they finish, and a
rerun skips the rows already there. Step time and MFU are roofline estimates (mmjax.compile).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("clip_b32", "siglip_b16", "siglip_so400m", "siglip2_b16", "siglip2_so400m", "llava_vitl14_llama",
           "flamingo_vitl14")
# v5e-4, -16, -64 and -256; v5p for the models v5e cannot hold.
SLICES = ("v5e:2x2", "v5e:4x4", "v5e:8x8", "v5e:16x16", "v5p:2x2x1", "v5p:4x4x4")


def compile_row(recipe: str, topology: str, attention: str, timeout: int) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "report.json")
    cmd = [sys.executable, "-m", "mmjax.compile", "--config", f"configs/{recipe}.py", "--topology", topology,
           f"--config.model.attention_impl={attention}", "--json", out]
    try:
      run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      return {"error": f"no result in {timeout} s"}
    if not os.path.exists(out):
      last = (run.stderr.strip().splitlines() or ["no output"])[-1]
      return {"error": f"the compile process died (exit {run.returncode}) without a report: {last}"}
    with open(out, encoding="utf-8") as f:
      return json.load(f)


def table(rows: list[dict]) -> str:
  lines = ["| recipe | slice | attention | batch (per device) | HBM GiB/device | fits | GFLOPs/device | "
           "est. step s | est. MFU | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    head = f"| {r['recipe']} | {r['slice']} | {r['attention']} |"
    if "total_gib" not in r:  # Did not compile (or ran out of memory while compiling).
      reason = r["error"].splitlines()[0]
      fits = "no" if "does not fit" in reason or "RESOURCE_EXHAUSTED" in reason else "error"
      lines.append(f"{head} | | {fits}: {reason[:160]} | | | | |")
      continue
    per_device = r["batch"] // max(1, r["mesh"].get("data", 1) * r["mesh"].get("fsdp", 1))
    flops = f"{r['gflops']:,.0f}" if "gflops" in r else ""
    step = f"{r['step_s']:.3f}" if "step_s" in r else ""
    mfu = f"{r['mfu']:.0%}" if "mfu" in r else ""
    lines.append(f"{head} {r['batch']} ({per_device}) | {r['total_gib']:.2f} of {r['hbm_gib']:.0f} | "
                 f"{'yes' if r['fits'] else 'no'} | {flops} | {step} | {mfu} | {r['compile_s']:.0f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--recipes", nargs="+", default=RECIPES)
  parser.add_argument("--slices", nargs="+", default=SLICES)
  parser.add_argument("--attention", nargs="+", default=("xla", "pallas"))
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "tpu_compile.jsonl"))
  parser.add_argument("--timeout", type=int, default=3600, help="Seconds per row.")
  args = parser.parse_args()
  done = {}
  if os.path.exists(args.out):
    with open(args.out, encoding="utf-8") as f:
      for line in f:
        row = json.loads(line)
        done[row["recipe"], row["slice"], row["attention"]] = row
  rows = []
  for recipe in args.recipes:
    for topology in args.slices:
      for attention in args.attention:
        key = (recipe, topology, attention)
        if key not in done:
          done[key] = {"recipe": recipe, "slice": topology, "attention": attention,
                       **compile_row(recipe, topology, attention, args.timeout)}
          with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(done[key]) + "\n")
          print(table([done[key]]).splitlines()[-1], flush=True)
        rows.append(done[key])
  print(table(rows))


if __name__ == "__main__":
  main()
