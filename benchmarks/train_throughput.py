"""Training throughput: mmjax against open_clip (torch) on the same CLIP, one full AdamW step.

Both sides build the architecture from one open_clip model config (`MODELS`; mmjax through
`interop.open_clip.model_config_from_open_clip`), train on the same random batch (images,
77-token texts, CLIP's softmax loss, AdamW, no clipping), each in its own process (its own
allocator and thread pools, as users run them), and are timed in alternating rounds after
warm-up, so machine noise hits both alike. Prints samples/s of each and their ratio, the FLOPs
of each side's step (XLA's cost analysis of mmjax's compiled step; torch's FlopCounterMode for
open_clip, matmuls and convolutions), achieved FLOP/s, and that as a fraction of a float32
matmul peak measured in the same run; writes JSON.

  python benchmarks/train_throughput.py                       # ViT-B/32 CLIP, 224 px, batch 32
  python benchmarks/train_throughput.py --model small         # a quick run
  python benchmarks/train_throughput.py --pack_text           # mmjax packs captions (data.pack_text)
  python benchmarks/train_throughput.py --pack_text --open_clip_reuses_memory   # glibc set alike on both sides
  python benchmarks/train_throughput.py --model b16 --device gpu --dtype bfloat16 --attention_impl cudnn --no_torch
"""
import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from mmjax import parallel, runtime  # noqa: E402
from mmjax.config import base_config  # noqa: E402
from mmjax.interop.open_clip import model_config_from_open_clip  # noqa: E402
from mmjax.tasks.contrastive import ContrastiveTask  # noqa: E402
from mmjax.runs import make_train_step, sharded_state  # noqa: E402

_CLIP_TEXT = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)
# open_clip's model configs (ViT-B-32, ViT-B-16; a test compares them with open_clip's own), so that
# an mmjax-only run (`--no_torch`, e.g. on a GPU machine) needs no open_clip; `small` for quick runs.
MODELS = {
    "b32": dict(embed_dim=512, vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=32), text_cfg=_CLIP_TEXT),
    "b16": dict(embed_dim=512, vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=16), text_cfg=_CLIP_TEXT),
    "small": dict(embed_dim=256, vision_cfg=dict(image_size=64, patch_size=16, width=256, layers=2, head_width=64),
                  text_cfg=dict(context_length=77, vocab_size=49408, width=256, heads=4, layers=2)),
}


def random_batch(cfg: dict, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """NHWC images in [-1, 1] and token rows ending in the end-of-text id (the highest id, as
  OpenAI's vocabulary: open_clip and mmjax pool there), padded with 0."""
  rng = np.random.default_rng(seed)
  size, text = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]
  length, vocab = text.get("context_length", 77), text.get("vocab_size", 49408)
  images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  tokens = np.zeros((batch, length), np.int32)
  for row, n in zip(tokens, rng.integers(5, length, batch)):
    row[:n - 1] = rng.integers(1, vocab - 1, n - 1)
    row[n - 1] = vocab - 1
  return images, tokens


class MMJaxStep:
  """mmjax's jitted training step (the trainer's own) on one device, state donated each step."""

  def __init__(self, cfg: dict, batch: int, dtype: str, attention_impl: str, pack_text: bool, captions_per_row: int,
               images, tokens):
    c = base_config()
    model = model_config_from_open_clip(cfg)
    model.update(dtype=dtype, attention_impl=attention_impl)
    c.model = ml_collections.ConfigDict(model)
    c.data.update(tokenizer="shapes", image_size=model["image_size"], batch_size=batch,
                  pack_text=pack_text, captions_per_row=captions_per_row)
    c.loss.kind, c.loss.impl = "softmax", "all_gather"
    c.optim.update(lr=5e-4, warmup_steps=1, weight_decay=0.2, b2=0.98, clip_norm=0.0)
    c.mesh = (("data", 1), ("fsdp", 1), ("tensor", 1))
    c.total_steps = 1000
    self.mesh = parallel.make_mesh(c.mesh, devices=jax.devices()[:1])
    rules = parallel.axis_rules(c.axis_rules, self.mesh)
    task = ContrastiveTask(c, self.mesh)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(rules):
      abstract, shardings, tx, lr, init = sharded_state(task, c, self.mesh, rules)
      self.state = init(jax.random.key(0))
      self.step = make_train_step(task, tx, lr, shardings, self.mesh)
      local = task.prepare_batch({"image": images, "text": tokens})  # As the trainer does.
      self.text_rows = len(local["text"])
      self.batch = parallel.global_batch(local, self.mesh)
      self.compiled = self.step.lower(abstract, self.batch, jax.random.key(0)).compile()
    self.rng = jax.random.key(1)
    self.parameters = sum(x.size for x in jax.tree.leaves(self.state["params"]))

  def flops(self) -> float:
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])

  def __call__(self, n: int) -> float:
    with jax.set_mesh(self.mesh):
      t0 = time.perf_counter()
      for _ in range(n):
        self.state, metrics = self.compiled(self.state, self.batch, self.rng)
      jax.block_until_ready(metrics["loss"])
    return time.perf_counter() - t0


class TorchStep:
  """open_clip's CLIP with torch AdamW and its ClipLoss: forward, backward, step."""

  def __init__(self, cfg: dict, images, tokens):
    import open_clip
    import torch
    self.torch = torch
    self.model = open_clip.model.CLIP(**cfg)
    self.model.train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=5e-4, betas=(0.9, 0.98), weight_decay=0.2)
    self.loss = open_clip.loss.ClipLoss()
    self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    self.tokens = torch.from_numpy(tokens).long()
    self.parameters = sum(p.numel() for p in self.model.parameters())

  def flops(self) -> float:
    """FLOPs of one step as torch counts them: matmuls and convolutions (its counter does not
    see the CPU flash-attention kernel, 2% of a ViT-B/32 step)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
      self(1)
    return float(counter.get_total_flops())

  def __call__(self, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
      image_features, text_features, logit_scale = self.model(self.images, self.tokens)
      loss = self.loss(image_features, text_features, logit_scale)
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      self.opt.step()
    return time.perf_counter() - t0


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` float32 n x n matmuls in XLA."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
  return 2 * n ** 3 / best


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def serve(side: str, args: argparse.Namespace, conn) -> None:
  """One side in its own process, so that each framework has its own allocator: builds the
  step, reports `info`, then runs the number of steps it is sent and answers with the seconds."""
  if side == "mmjax":
    tuned = runtime.tune_cpu_runtime()  # As `mmjax.train` does.
  else:  # torch as users run it, or with glibc set as mmjax sets it (`--open_clip_reuses_memory`).
    tuned = {"host_memory_reuse": args.open_clip_reuses_memory and runtime.reuse_freed_host_memory()}
  cfg = MODELS[args.model]
  images, tokens = random_batch(cfg, args.batch)
  t0 = time.perf_counter()
  if side == "mmjax":
    if jax.devices()[0].platform != args.device:
      raise SystemExit(f"--device {args.device}, but JAX runs on {jax.devices()[0].platform}")
    run = MMJaxStep(cfg, args.batch, args.dtype, args.attention_impl, args.pack_text, args.captions_per_row,
                    images, tokens)
    info = {"flops": run.flops(), "device": jax.devices()[0].device_kind, "text_rows": run.text_rows, **tuned}
  else:
    run = TorchStep(cfg, images, tokens)
    info = {"flops": run.flops(), **tuned}
  info.update(parameters=run.parameters, build_s=time.perf_counter() - t0)
  run(args.warmup)
  conn.send(info)
  while (n := conn.recv()) is not None:
    conn.send(matmul_peak() if n == "peak" else run(n))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="b32", choices=tuple(MODELS))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--attention_impl", default="xla")
  parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
  parser.add_argument("--pack_text", action="store_true",
                      help="mmjax packs captions several per row (data.pack_text), so its text tower skips padding.")
  parser.add_argument("--captions_per_row", type=int, default=6, help="With --pack_text: at most this many per row.")
  parser.add_argument("--warmup", type=int, default=2, help="Untimed steps per side.")
  parser.add_argument("--rounds", type=int, default=4, help="Alternating timed rounds.")
  parser.add_argument("--steps", type=int, default=2, help="Steps per side per round.")
  parser.add_argument("--no_torch", action="store_true", help="mmjax only (GPU runs).")
  parser.add_argument("--open_clip_reuses_memory", action="store_true",
                      help="Set glibc in the open_clip process as mmjax sets it in its own (keep freed memory).")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="Device peak for MFU (e.g. 989 for an H100 SXM in bf16); default: measured matmul.")
  parser.add_argument("--out", default="benchmarks/train_throughput.json")
  args = parser.parse_args()
  context = multiprocessing.get_context("spawn")
  conns, workers, info = {}, [], {}
  for side in ("mmjax",) if args.no_torch else ("mmjax", "open_clip"):  # One at a time: building is timed.
    conns[side], child = context.Pipe()
    workers.append(context.Process(target=serve, args=(side, args, child), daemon=True))
    workers[-1].start()
    child.close()  # Only the worker holds its end now, so its death ends `recv` with EOFError.
    try:
      info[side] = conns[side].recv()
    except EOFError:
      raise SystemExit(f"the {side} process failed while building its step (its error is above)") from None
  times = {side: [] for side in conns}
  for _ in range(args.rounds):
    for side, conn in conns.items():
      conn.send(args.steps)
      times[side].append(conn.recv() / args.steps)
  if args.peak_tflops:
    peak = args.peak_tflops * 1e12
  else:
    conns["mmjax"].send("peak")
    peak = conns["mmjax"].recv()
  for conn in conns.values():
    conn.send(None)
  for worker in workers:
    worker.join()
  report(args, info, times, peak)


def report(args, info: dict, times: dict, peak: float) -> None:
  ours = info["mmjax"]
  step_s = {side: statistics.median(t) for side, t in times.items()}
  rate = {side: args.batch / s for side, s in step_s.items()}
  flops = {side: info[side]["flops"] for side in times}
  achieved = {side: flops[side] / step_s[side] for side in times}
  result = {"model": args.model, "batch": args.batch, "dtype": args.dtype, "attention_impl": args.attention_impl,
            "pack_text": args.pack_text,
            "captions_per_row": args.captions_per_row if args.pack_text else None, "mmjax_text_rows": ours["text_rows"],
            "device": ours["device"], "cpus": os.cpu_count(), "machine": platform.machine(),
            "parameters": ours["parameters"], "build_s": {side: round(i["build_s"], 1) for side, i in info.items()},
            "step_s": step_s, "samples_per_s": rate, "flops_per_step": flops, "achieved_flops": achieved,
            "peak_flops": peak, "host_memory_reuse": {side: i["host_memory_reuse"] for side, i in info.items()},
            "sequential_schedule": ours["sequential_schedule"],
            "peak_source": "given" if args.peak_tflops else "measured float32 matmul",
            "fraction_of_peak": {side: a / peak for side, a in achieved.items()}, "rounds": times}
  print(f"{args.model} CLIP, batch {args.batch}, {args.dtype}, attention {args.attention_impl}, "
        f"{result['device']} ({os.cpu_count()} CPUs), {ours['parameters'] / 1e6:.1f} M parameters")
  if args.pack_text:
    print(f"mmjax packs the {args.batch} captions into {ours['text_rows']} rows (data.pack_text, up to "
          f"{args.captions_per_row} per row); open_clip "
          f"runs all {args.batch}")
  print(f"{'side':<10}{'step s':>10}{'samples/s':>12}{'build s':>10}{'GFLOP/step':>12}{'GFLOP/s':>10}{'of peak':>9}")
  for side in times:
    print(f"{side:<10}{step_s[side]:>10.3f}{rate[side]:>12.1f}{info[side]['build_s']:>10.1f}"
          f"{flops[side] / 1e9:>12.1f}{achieved[side] / 1e9:>10.1f}{100 * achieved[side] / peak:>8.1f}%")
  if "open_clip" in rate:
    result["ratio"] = rate["mmjax"] / rate["open_clip"]
    print(f"mmjax / open_clip samples/s: {result['ratio']:.3f}")
  print(f"FLOPs: mmjax's counted by XLA's cost analysis of the compiled step (every op), open_clip's by "
        f"torch's FlopCounterMode (matmuls, convolutions); peak {peak / 1e9:.1f} GFLOP/s "
        f"({result['peak_source']})")
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
