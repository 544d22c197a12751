"""Per-device memory of the ViT-B/16 CLIP and SigLIP training steps on 1-8 devices, DP vs FSDP.

Compiles (never runs) the trainer's step on fake CPU devices at a fixed per-device batch and
reads XLA's memory analysis: `state` is the per-device arguments (parameters, optimizer state,
the batch slice), `temp` the step's temporaries. Under FSDP (`fsdp` = D) the parameter and
optimizer-state share falls about as 1/D; under pure data parallelism (`data` = D) it stays flat.

  python benchmarks/scaling_memory.py --per_device_batch 32 --devices 1,2,4,8
"""
import argparse
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from mmjax import config as mmjax_config, parallel  # noqa: E402
from mmjax.runs import lower_train_step  # noqa: E402

MIB = 2 ** 20
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")


def model_config(kind: str):
  """SigLIP B/16 (`configs/siglip_b16.py`); CLIP B/16: the same with CLIP's softmax loss and tokens."""
  c = mmjax_config.load(os.path.join(CONFIGS, "siglip_b16.py" if kind == "siglip" else "clip_b32.py"))
  if kind == "clip":
    c.model.image.variant = "B/16"
    c.model.image.scan = c.model.text.scan = True
  c.data.tokenizer = "shapes"
  return c


def memory(kind: str, mode: str, devices: int, per_device_batch: int) -> dict:
  c = model_config(kind)
  c.data.batch_size, c.data.per_device_batch_size = per_device_batch * devices, 0
  c.mesh = (("data", devices if mode == "dp" else 1), ("fsdp", devices if mode == "fsdp" else 1), ("tensor", 1))
  mesh = parallel.make_mesh(c.mesh, devices=jax.devices()[:devices])
  lowered, _ = lower_train_step(c, mesh)
  m = lowered.compile().memory_analysis()
  return dict(model=kind, mode=mode, devices=devices, state_mib=m.argument_size_in_bytes / MIB,
              temp_mib=m.temp_size_in_bytes / MIB, output_mib=m.output_size_in_bytes / MIB)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--per_device_batch", type=int, default=32)
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--models", default="clip,siglip")
  parser.add_argument("--out", default="benchmarks/scaling_memory.json")
  args = parser.parse_args()
  rows = []
  print(f"per-device MiB, ViT-B/16 at {args.per_device_batch} images per device, bf16 compute, f32 params")
  print(f"{'model':<8}{'mode':<6}{'D':>3}{'state':>10}{'temp':>10}{'state x D':>11}")
  for kind in args.models.split(","):
    for mode in ("dp", "fsdp"):
      for d in (int(x) for x in args.devices.split(",")):
        r = memory(kind, mode, d, args.per_device_batch)
        rows.append(r)
        print(f"{kind:<8}{mode:<6}{d:>3}{r['state_mib']:>10.1f}{r['temp_mib']:>10.1f}{r['state_mib'] * d:>11.1f}",
              flush=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"per_device_batch": args.per_device_batch, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
