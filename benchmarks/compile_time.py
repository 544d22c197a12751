"""Compile time of training steps: scanned vs unrolled layers at two depths, and the scale recipes.

Lowers and compiles (never runs) the trainer's step for abstract inputs on 8 fake CPU devices.
With `nn.scan` over layers the ViT-B/16 SigLIP step should compile in about the same time at
12 and 24 image layers; unrolled, compile time grows with depth. Prints tables, writes JSON.

  python benchmarks/compile_time.py
  python benchmarks/compile_time.py --recipes siglip_b16,clip_b32 --batch 256
"""
import argparse
import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import config as mmjax_config  # noqa: E402
from mmjax.runs import lower_train_step  # noqa: E402

RECIPES = ("siglip_b16", "clip_b32", "siglip_so400m", "flamingo_vitl14", "llava_vitl14_llama")


def timed_compile(config) -> tuple[float, float]:
  t0 = time.perf_counter()
  lowered, _ = lower_train_step(config)
  t1 = time.perf_counter()
  lowered.compile()
  return t1 - t0, time.perf_counter() - t1


def recipe(name: str, batch: int):
  c = mmjax_config.load(os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py"))
  if c.task == "contrastive":
    c.data.tokenizer = "shapes"  # The recipes name the user's tokenizer; the vocabulary size is set.
  c.data.batch_size, c.data.per_device_batch_size = batch, 0
  return c


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256, help="Global batch (compile time barely depends on it).")
  parser.add_argument("--depths", default="12,24")
  parser.add_argument("--recipes", default=",".join(RECIPES))
  parser.add_argument("--out", default="benchmarks/compile_time.json")
  args = parser.parse_args()
  depth_rows = []
  print(f"ViT-B/16 SigLIP training step, image tower depth x layers, batch {args.batch}, 8 CPU devices")
  print(f"{'depth':>6}{'layers':>10}{'lower s':>10}{'compile s':>11}")
  for depth in (int(d) for d in args.depths.split(",")):
    for scan in (True, False):
      c = recipe("siglip_b16", args.batch)
      c.model.image.depth, c.model.image.scan, c.model.text.scan = depth, scan, scan
      lower_s, compile_s = timed_compile(c)
      depth_rows.append(dict(depth=depth, scan=scan, lower_s=lower_s, compile_s=compile_s))
      print(f"{depth:>6}{'scan' if scan else 'unrolled':>10}{lower_s:>10.1f}{compile_s:>11.1f}", flush=True)
  recipe_rows = []
  print(f"\nscale recipes, batch {args.batch}, their own mesh on 8 CPU devices")
  print(f"{'recipe':<22}{'lower s':>10}{'compile s':>11}")
  for name in args.recipes.split(","):
    lower_s, compile_s = timed_compile(recipe(name, args.batch))
    recipe_rows.append(dict(recipe=name, lower_s=lower_s, compile_s=compile_s))
    print(f"{name:<22}{lower_s:>10.1f}{compile_s:>11.1f}", flush=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"batch": args.batch, "depth": depth_rows, "recipes": recipe_rows}, f, indent=2)


if __name__ == "__main__":
  main()
