"""Attention implementations side by side: correctness, compiled memory, and (on an accelerator) speed.

For each (seq, head_dim) and each implementation behind `mmjax.ops.attention` (`xla`,
`cudnn` on GPU only, `pallas`) it reports
  - err: max |out - float64 NumPy reference| of the forward (seq <= --check_max_seq),
  - MiB: temporary memory of the compiled forward + backward from XLA's memory analysis,
  - on GPU/TPU: median ms and TFLOP/s of forward and of forward + backward, counted as
    4·B·H·Sq·Sk·D for the forward and 2.5x that for forward + backward.
On CPU (Pallas in interpret mode) timings are meaningless and left out.

  python benchmarks/attention.py                      # CPU: memory and correctness
  python benchmarks/attention.py --dtype bfloat16     # on a GPU: adds timings
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mmjax.ops.attention import dot_product_attention  # noqa: E402

MIB = 2 ** 20


def attention_flops(batch, heads, q_len, kv_len, head_dim, backward):
  """4·B·H·Sq·Sk·D for the forward; forward + backward counts 2.5x that."""
  forward = 4 * batch * heads * q_len * kv_len * head_dim
  return forward * (2.5 if backward else 1.0)


def implementations():
  return ("xla", "cudnn", "pallas") if jax.default_backend() == "gpu" else ("xla", "pallas")


def reference(q, k, v, causal):
  """float64 forward, one head at a time to bound host memory."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  out = np.empty_like(q)
  seq = q.shape[1]
  allowed = np.tril(np.ones((seq, seq), bool)) if causal else np.ones((seq, seq), bool)
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      logits = np.where(allowed, q[b, :, h] @ k[b, :, h].T / np.sqrt(q.shape[-1]), -np.inf)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h]
  return out


def median_seconds(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure(impl, batch, heads, seq, dim, dtype, causal, check, repeats, rng):
  forward = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, causal=causal, impl=impl))
  grads = jax.jit(jax.grad(lambda q, k, v: forward(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
  spec = jax.ShapeDtypeStruct((batch, seq, heads, dim), dtype)
  row = {"impl": impl, "seq": seq, "head_dim": dim,
         "temp_bytes": grads.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes}
  if not check and jax.default_backend() == "cpu":
    return row
  q, k, v = (jnp.asarray(rng.normal(size=spec.shape), dtype) for _ in range(3))
  if check:
    row["max_err"] = float(np.abs(np.asarray(forward(q, k, v), np.float64) - reference(q, k, v, causal)).max())
  if jax.default_backend() != "cpu":
    for name, fn, flops in (("fwd", forward, attention_flops(batch, heads, seq, seq, dim, backward=False)),
                            ("fwd_bwd", grads, attention_flops(batch, heads, seq, seq, dim, backward=True))):
      seconds = median_seconds(fn, (q, k, v), repeats)
      row[f"{name}_ms"] = seconds * 1e3
      row[f"{name}_tflops"] = flops * (0.5 if causal else 1.0) / seconds / 1e12
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--seqs", default="197,577,1024,4096,8192")
  parser.add_argument("--head_dims", default="64,128")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--causal", action="store_true")
  parser.add_argument("--check_max_seq", type=int, default=1024,
                      help="check against float64 NumPy only up to this length (it is O(seq^2) on the host)")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default="benchmarks/attention.json")
  args = parser.parse_args()

  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  rows = []
  for dim in [int(d) for d in args.head_dims.split(",")]:
    for seq in [int(s) for s in args.seqs.split(",")]:
      for impl in implementations():
        rows.append(measure(impl, args.batch, args.heads, seq, dim, dtype, args.causal,
                            seq <= args.check_max_seq, args.repeats, rng))

  timed = jax.default_backend() != "cpu"
  print(f"Attention, B={args.batch} H={args.heads} {args.dtype} causal={args.causal} on "
        f"{jax.devices()[0].device_kind} (jax {jax.__version__}); MiB = compiled fwd+bwd temp memory\n")
  header = ["D", "seq", "impl", "max err", "MiB"] + (["fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s"]
                                                     if timed else [])
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    cells = [r["head_dim"], r["seq"], r["impl"], f"{r['max_err']:.1e}" if "max_err" in r else "-",
             f"{r['temp_bytes'] / MIB:.1f}"]
    if timed:
      cells += [f"{r['fwd_ms']:.3f}", f"{r['fwd_tflops']:.1f}", f"{r['fwd_bwd_ms']:.3f}",
                f"{r['fwd_bwd_tflops']:.1f}"]
    print("| " + " | ".join(str(c) for c in cells) + " |")

  with open(args.out, "w") as f:
    json.dump({"batch": args.batch, "heads": args.heads, "dtype": args.dtype, "causal": args.causal,
               "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
               "jax_version": jax.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
