"""Small configs shared by the tests (tiny towers that compile and train in seconds), float64 NumPy
references of the layers many models share, with random parameters to run them on, and runners of
commands and notebooks as users run them."""
import importlib
import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np

from mmjax import export, train
from mmjax.config import tower
from configs import siglip_shapes


def tiny_config(**overrides):
  c = siglip_shapes.get_config()
  c.model.image = tower(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, posemb="learn", pool="map",
                        head="none")
  c.model.text = tower(vocab_size=None, max_len=16, width=32, depth=1, mlp_dim=64, num_heads=2,
                       pool="last", causal=False, eos_id=2)
  c.model.embed_dim = 32
  c.data.image_size = 32
  c.data.batch_size = 16
  c.optim.warmup_steps = 1
  c.total_steps = 4
  c.log_every, c.checkpoint_every, c.eval_every = 2, 2, 0
  c.evals.update(batch_size=64, zeroshot=dict(templates="shapes", per_class=2), retrieval=dict(n=64),
                 binding=dict(n=64))
  c.update(overrides)
  return c


def logged_losses(workdir):
  """The training losses a run logged to its metrics.jsonl, in step order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [m["loss"] for m in map(json.loads, f) if "loss" in m]


_trained_tiny_backbone = {}


def untrained_export(out: str) -> str:
  """An export of an untrained tiny two-tower model (`tiny_config`'s), for what needs embeddings,
  not good ones: indexes, benchmark readers and metrics."""
  from flax import linen as nn
  from mmjax import bundle, models
  from mmjax.data.tokenizer import load_tokenizer
  from mmjax.tasks.contrastive import model_config_with_vocab
  config = tiny_config()
  tokenizer = load_tokenizer(config.data.tokenizer)
  model_config = model_config_with_vocab(config.model, tokenizer)
  model_config["image_size"] = config.data.image_size
  model = models.build(model_config)
  size, max_len = config.data.image_size, model_config["text"]["max_len"]
  params = nn.unbox(model.init(jax.random.key(0), image=np.zeros((1, size, size, 3), np.float32),
                               text=np.zeros((1, max_len), np.int32))["params"])
  return bundle.write(out, model_config, params, tokenizer, {"test": "untrained"})


def untrained_vlm_export(out: str, kind: str = "llava", image_size: int = 16, seed: int = 0) -> str:
  """An export of a tiny vision-language model (`configs/<kind>_shapes.py` with widths of 32, one block
  per stack, 8-pixel patches of `image_size` images) with `random_params`: untrained but with every
  parameter away from its initial value, for benchmark readers and metrics."""
  from mmjax import bundle, models
  from mmjax.data.tokenizer import load_tokenizer
  from mmjax.tasks.generative import model_config_with_tokens
  small = dict(width=32, depth=1, num_heads=2, mlp_dim=64)
  overrides = {**{f"model.vision.{k}": v for k, v in small.items()}, **{f"model.lm.{k}": v for k, v in small.items()}}
  if kind == "llava":
    overrides["model.image_size"] = image_size
  elif kind == "flamingo":
    overrides.update({"model.perceiver": dict(depth=1, num_latents=4, num_heads=2, mlp_dim=64, max_media=2),
                      "model.xattn": dict(num_heads=2, mlp_dim=64)})
  elif kind == "blip2":
    overrides["model.qformer"] = dict(depth=1, num_queries=4, width=32, num_heads=2, mlp_dim=64,
                                      cross_attention_every=1)
  config = tiny_generative_recipe(f"{kind}_shapes", **overrides)
  tokenizer = load_tokenizer(config.data.tokenizer)
  model_config = model_config_with_tokens(config.model, tokenizer)
  model = models.build(model_config)
  tokens = np.full((1, 8), model_config["image_token_id"], np.int32)
  tokens[0, model.num_image_tokens:] = tokenizer.eos_id
  params = random_params(model, np.zeros((1, 1, image_size, image_size, 3), np.float32), tokens, seed=seed)
  return bundle.write(out, model_config, params, tokenizer, {"test": "untrained"})


def run_module(*args, cwd) -> str:
  """`python -m <args>` in `cwd` as a user runs it (JAX on the CPU); its stdout and stderr, after
  asserting that it succeeded."""
  proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout + proc.stderr


NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


def run_notebook(name: str, cwd, **env) -> tuple[str, int]:
  """Executes notebooks/<name> in a fresh kernel started in `cwd` (outside the repository), with its
  install cell skipped (mmjax is installed) and `env` set; returns its printed text and the number
  of figures it drew."""
  import nbclient
  import nbformat
  notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  saved = {k: os.environ.get(k) for k in [*env, "MMJAX_SKIP_INSTALL"]}
  os.environ.update({**env, "MMJAX_SKIP_INSTALL": "1"})
  try:
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  return "".join(o.get("text", "") for o in outputs), sum("image/png" in o.get("data", {}) for o in outputs)


def trained_tiny_backbone(tmp_path_factory):
  """`(run dir, export dir)` of `tiny_config` trained for 600 steps (~35 s on 2 CPU cores), trained once per
  session for every module that needs a backbone that has learned: its loss sits at ~3.74 for the first
  100-200 steps, then falls to 2.3 by step 600, where shapes zero-shot accuracy is 0.24 (chance 1/48)."""
  if not _trained_tiny_backbone:
    root = tmp_path_factory.mktemp("trained_tiny_backbone")
    train.train(tiny_config(total_steps=600, checkpoint_every=600, log_every=100), str(root / "run"))
    _trained_tiny_backbone["dirs"] = str(root / "run"), export.export(str(root / "run"), str(root / "export"))
  return _trained_tiny_backbone["dirs"]


def tiny_generative_recipe(name, arg=None, **overrides):
  """`configs/<name>.py[:arg]` cut to 4 steps of 16 sequences with 16-question evals; `overrides` maps
  dotted config keys ("model.lm.width") to values."""
  c = importlib.import_module(f"configs.{name}").get_config(arg)
  c.total_steps, c.optim.warmup_steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 1, 2, 4, 4
  c.data.batch_size, c.evals.batch_size = 16, 16
  c.evals.vqa.n = 16
  if "described_vqa" in c.evals:
    c.evals.described_vqa.n = 16
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return c


def random_params(model, *args, seed=0, scale=0.3):
  """float32 parameters of `model.init(*args)`'s shapes, every one drawn N(0, scale²): no bias or norm
  is left at its initial 0 or 1, so a reference that skips one fails."""
  shapes = flax.linen.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.normal(size=s.shape)).astype(np.float32), shapes)


def np_layer_norm(p, x, eps=1e-6):
  x = x - x.mean(-1, keepdims=True)
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def np_attention(p, xq, xkv):
  """Multi-head attention with flax's `query/key/value/out` einsum parameters."""
  q, k, v = (np.einsum("bld,dhk->blhk", x, p[n]["kernel"]) + p[n]["bias"]
             for n, x in (("query", xq), ("key", xkv), ("value", xkv)))
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bqhk,hkd->bqd", np.einsum("bhqs,bshk->bqhk", probs, v), p["out"]["kernel"]) + p["out"]["bias"]


def np_mlp(p, x):
  """`MlpBlock` with the tanh GELU."""
  h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def np_cross_block(p, queries, inputs):
  """`CrossAttentionBlock`: pre-LN cross-attention, then the MLP, each with a residual."""
  y = queries + np_attention(p["attention"], np_layer_norm(p["query_norm"], queries),
                             np_layer_norm(p["input_norm"], inputs))
  return y + np_mlp(p["mlp"], np_layer_norm(p["mlp_norm"], y))
