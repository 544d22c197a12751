"""The throughput benchmark runs end to end, and the FLOPs it reports are the model's."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("open_clip", reason="needs open_clip_torch: pip install -e '.[interop]'")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8


def matmul_flops_per_step(cfg: dict, batch: int) -> float:
  """Training-step matmul FLOPs of an open_clip CLIP config counted by hand: forward, plus
  twice that backward (input and weight gradients), except that the pixels need no gradient."""
  def tower(tokens, width, layers, mlp_ratio=4):
    per_layer = (4 * tokens * width * width  # q, k, v, out projections
                 + 2 * tokens * tokens * width  # scores and weighted values
                 + 2 * tokens * width * mlp_ratio * width)  # MLP
    return 2 * layers * per_layer
  vision, text, embed = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
  patches = (vision["image_size"] // vision["patch_size"]) ** 2
  patch_embedding = 2 * patches * vision["patch_size"] ** 2 * 3 * vision["width"]
  forward = (tower(patches + 1, vision["width"], vision["layers"])
             + tower(text["context_length"], text["width"], text["layers"])
             + 2 * embed * (vision["width"] + text["width"]))  # the two projections
  return batch * (3 * forward + 2 * patch_embedding)


@pytest.mark.slow
def test_train_throughput_runs_both_sides_and_counts_the_models_flops(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    from train_throughput import SMALL
  finally:
    sys.path.pop(0)
  out = tmp_path / "throughput.json"
  subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--model", "small", "--batch", str(BATCH),
                  "--warmup", "1", "--rounds", "1", "--steps", "1", "--out", str(out)],
                 cwd=ROOT, check=True, capture_output=True, text=True)
  result = json.loads(out.read_text())
  assert set(result["samples_per_s"]) == {"mmjax", "open_clip"}
  assert all(len(t) == 1 and t[0] > 0 for t in result["rounds"].values())
  assert result["host_memory_reuse"] is True
  # XLA counts every op; the matmuls are nearly all of it. The rest (AdamW over 16 M
  # parameters, norms, softmax, GELU) stays within a few percent at this size.
  expected = matmul_flops_per_step(SMALL, BATCH)
  assert 1.0 <= result["flops_per_step"] / expected < 1.15, (result["flops_per_step"], expected)
