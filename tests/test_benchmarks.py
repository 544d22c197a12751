"""The throughput benchmark runs end to end, and the FLOPs it reports are the model's."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("open_clip", reason="needs open_clip_torch: pip install -e '.[interop]'")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8


def matmul_flops_per_step(cfg: dict, batch: int, pooled_last_block: bool, attention: bool = True,
                          text_rows: int | None = None, per_row: int = 1) -> float:
  """Training-step matmul FLOPs of an open_clip CLIP config counted by hand: forward, plus
  twice that backward (input and weight gradients), except that the pixels need no gradient.
  `pooled_last_block`: each tower's last block computes only its pooled token (keys and values
  still come from every token). `attention=False` leaves out the scores and weighted values.
  `text_rows`: the captions packed into that many rows, each pooling `per_row` tokens."""
  def layer(tokens, queries, width, mlp_ratio=4):  # multiply-adds
    return (2 * tokens * width * width  # k, v projections
            + 2 * queries * width * width  # q, out projections
            + 2 * queries * tokens * width * attention  # scores and weighted values
            + 2 * queries * width * mlp_ratio * width)  # MLP

  def tower(tokens, width, layers, pooled=1):
    last = layer(tokens, pooled if pooled_last_block else tokens, width)
    return 2 * ((layers - 1) * layer(tokens, tokens, width) + last)
  vision, text, embed = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
  patches = (vision["image_size"] // vision["patch_size"]) ** 2
  patch_embedding = 2 * patches * vision["patch_size"] ** 2 * 3 * vision["width"]
  image = tower(patches + 1, vision["width"], vision["layers"]) + 2 * embed * vision["width"]
  rows, pooled = (batch, 1) if text_rows is None else (text_rows, per_row)
  caption_row = (tower(text["context_length"], text["width"], text["layers"], pooled)
                 + pooled * 2 * embed * text["width"])
  return batch * (3 * image + 2 * patch_embedding) + rows * 3 * caption_row


def _benchmark_models() -> dict:
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    from train_throughput import MODELS
  finally:
    sys.path.pop(0)
  return MODELS


def test_throughput_architectures_are_open_clips():
  import open_clip
  models = _benchmark_models()
  for name, theirs in (("b32", "ViT-B-32"), ("b16", "ViT-B-16")):
    assert models[name] == open_clip.get_model_config(theirs), name


@pytest.mark.slow
def test_train_throughput_runs_both_sides_and_counts_the_models_flops(tmp_path):
  small = _benchmark_models()["small"]
  out = tmp_path / "throughput.json"
  subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--model", "small", "--batch", str(BATCH),
                  "--warmup", "1", "--rounds", "1", "--steps", "1", "--open_clip_reuses_memory", "--out", str(out)],
                 cwd=ROOT, check=True, capture_output=True, text=True)
  result = json.loads(out.read_text())
  assert set(result["samples_per_s"]) == {"mmjax", "open_clip"}
  assert all(len(t) == 1 and t[0] > 0 for t in result["rounds"].values())
  assert result["host_memory_reuse"] == {"mmjax": True, "open_clip": True}
  # XLA counts every op; the matmuls are nearly all of it. The rest (AdamW over 16 M
  # parameters, norms, softmax, GELU) stays within a few percent at this size. open_clip runs
  # its last blocks on every token; mmjax on the pooled ones (40% less work at 2 layers). torch's
  # counter (2.14) does not see its CPU flash-attention kernel; one that does may come.
  flops = result["flops_per_step"]
  ours = matmul_flops_per_step(small, BATCH, pooled_last_block=True)
  assert 1.0 <= flops["mmjax"] / ours < 1.15, (flops["mmjax"], ours)
  theirs = [matmul_flops_per_step(small, BATCH, pooled_last_block=False, attention=a) for a in (False, True)]
  assert 0.99 * theirs[0] <= flops["open_clip"] <= 1.01 * theirs[1], (flops["open_clip"], theirs)


@pytest.mark.slow
def test_packed_captions_cut_the_counted_flops_as_their_rows(tmp_path):
  small = _benchmark_models()["small"]
  out = tmp_path / "throughput.json"
  subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--model", "small", "--batch", str(BATCH),
                  "--pack_text", "--no_torch", "--warmup", "1", "--rounds", "1", "--steps", "1", "--out", str(out)],
                 cwd=ROOT, check=True, capture_output=True, text=True)
  result = json.loads(out.read_text())
  rows = result["mmjax_text_rows"]
  assert result["pack_text"] and rows < BATCH
  flops = result["flops_per_step"]["mmjax"]
  ours = matmul_flops_per_step(small, BATCH, pooled_last_block=True, text_rows=rows,
                               per_row=result["captions_per_row"])
  assert 1.0 <= flops / ours < 1.15, (flops, ours)
