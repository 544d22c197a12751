"""`python -m mmjax.base_to_novel --workdir DIR [--config configs/prompt_shapes.py]`: the base-to-novel
protocol (CoCoOp's): adapt on k shots of the base classes, test on base and novel.

For every method and seed: base accuracy (test images of base classes among the base classes),
novel accuracy (novel among novel) and their harmonic mean, then the mean over seeds.
Methods: "zeroshot" (template ensemble, nothing trained), "linear_probe" (logistic regression
on the frozen image embeddings of the shots, `mmjax.adapt.probe`; it has no weights for classes
it never saw, so no novel accuracy), and the methods of `mmjax.tasks.prompt_learning` (the
prompt learners, and "lora": the template prompt with LoRA on both towers), each trained by
`mmjax.train` with the recipe's config for that method, the seed set per run. Runs are kept under
--workdir, so a rerun reads finished ones back. Prints method x base / novel / HM / trainable
parameters / seconds per run (means over seeds) and writes `base_to_novel.json` there.

  python -m mmjax.base_to_novel --workdir runs/base_to_novel
  python -m mmjax.base_to_novel --backbone runs/seeds/seed1 --workdir runs/b2n_seed1
  python -m mmjax.base_to_novel --image_folder /data/flowers --workdir runs/b2n_flowers
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from absl import flags

from mmjax import cli, config as mmjax_config, parallel, runs, runtime, train
from mmjax.adapt import probe
from mmjax.adapt.wrap import ADAPTER
from mmjax.data import classes
from mmjax.data.shapes import CLASS_TEMPLATES
from mmjax.errors import ConfigError
from mmjax.evals import zeroshot as zeroshot_eval
from mmjax.tasks.contrastive import ContrastiveTask
from mmjax.tasks.prompt_learning import PROMPT, PromptLearningTask, harmonic_mean

TRAINED = ("coop", "cocoop", "maple", "coprompt", "lora")  # Arguments of the recipe, trained by mmjax.train.
METHODS = ("zeroshot", "linear_probe") + TRAINED


def backbone(config):
  """`(contrastive task, params)` of the model that `config.init_from` starts "base" from (a run or
  an export), the task built from `config` (its model, tokenizer and evals.batch_size)."""
  sources = {entry[0]: entry[1] for entry in config.init_from}
  if "base" not in sources:
    raise ConfigError("base-to-novel needs config.init_from=(('base', <backbone run or export>),)")
  return ContrastiveTask(config, parallel.make_mesh(config.mesh)), runs.load_params(sources["base"])


def zeroshot(task: ContrastiveTask, params, data: classes.ClassData) -> dict[str, float]:
  """Accuracies of the template-ensemble classifier within each split."""
  out = {}
  for split, ids in (("base", data.base), ("novel", data.novel)):
    names = [data.class_names[c] for c in ids]
    zclass = zeroshot_eval.class_embeddings(lambda t: task.embed_texts(params, t), names, CLASS_TEMPLATES)
    images, labels = data.test_set(split)
    out[f"{split}_acc"] = zeroshot_eval.evaluate(task.embed_images(params, images), zclass, labels)["acc"]
  out["hm"] = harmonic_mean(out["base_acc"], out["novel_acc"])
  return out


def linear_probe(task: ContrastiveTask, params, data: classes.ClassData, kind: str = "logistic") -> dict:
  """Base accuracy of a probe fitted on the shots' frozen image embeddings."""
  shots = data.train
  features = task.embed_images(params, shots.images)
  labels = np.searchsorted(data.base, shots.labels)
  w, b = probe.fit(kind, features, labels, len(data.base))
  images, test_labels = data.test_set("base")
  logits = probe.predict(w, b, task.embed_images(params, images))
  return {"base_acc": float(probe.accuracy(logits, test_labels)), "trainable": int(w.size + b.size)}


def run(config_for, workdir: str, methods=METHODS, seeds=(0, 1, 2)) -> dict:
  """`{method: {"seeds": [per-seed results], "mean": {...}}}`. `config_for(method)` is the recipe's
  config for a method (`mmjax.config.load("configs/prompt_shapes.py:method=coop")`); trained runs go to
  workdir/<method>_<seed> (a finished run is read back, not retrained)."""
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise ConfigError(f"methods {unknown}: known {list(METHODS)}")
  task, params = backbone(config_for("coop"))
  results = {}
  for method in methods:
    per_seed = []
    trainable = trainable_count(config_for(method)) if method in TRAINED else None
    for seed in seeds:
      c = config_for(method if method in TRAINED else "coop")
      c.data.shot_seed, c.seed = seed, seed
      data = classes.load(c.data)
      t0 = time.perf_counter()
      if method == "zeroshot":
        r = zeroshot(task, params, data) | {"trainable": 0}
      elif method == "linear_probe":
        r = linear_probe(task, params, data)
      else:
        summary = train.train(c, os.path.join(workdir, f"{method}_{seed}"))
        r = {k: summary[k] for k in ("base_acc", "novel_acc", "hm") if k in summary}
        r["trainable"] = trainable
      r["seconds"] = round(time.perf_counter() - t0, 1)
      per_seed.append(r)
    keys = per_seed[0].keys()
    results[method] = {"seeds": per_seed, "mean": {k: float(np.mean([r[k] for r in per_seed])) for k in keys}}
  os.makedirs(workdir, exist_ok=True)
  config = config_for("coop")
  with open(os.path.join(workdir, "base_to_novel.json"), "w", encoding="utf-8") as f:
    json.dump({"data": config.data.to_dict(), "steps": config.total_steps, "results": results}, f, indent=2)
  return results


def trainable_count(config) -> int:
  """Parameters a prompt-learning run trains: its prompt and adapter subtrees."""
  task = PromptLearningTask(config, None)
  shapes = jax.eval_shape(task.init, jax.random.key(0), task.dummy_batch(1))
  trained = [shapes[k] for k in (PROMPT, ADAPTER) if k in shapes]
  return int(sum(np.prod(x.value.shape) for x in jax.tree.leaves(trained, is_leaf=lambda x: hasattr(x, "value"))))


def table(results: dict) -> str:
  """Method x base / novel / HM / trainable parameters / seconds per run, means over seeds."""
  lines = [f"{'method':<14}{'base':>8}{'novel':>8}{'HM':>8}{'trainable':>11}{'s/run':>8}", "-" * 57]
  for method, r in results.items():
    m = r["mean"]
    cells = [f"{m[k]:8.3f}" if k in m else f"{'-':>8}" for k in ("base_acc", "novel_acc", "hm")]
    lines.append(f"{method:<14}{''.join(cells)}{int(m['trainable']):>11,}{m['seconds']:>8.1f}")
  return "\n".join(lines)


def main(argv):
  del argv
  runtime.quiet_logs()
  f = flags.FLAGS

  def config_for(method):
    config = mmjax_config.load(f"{f.config}:method={method}")
    if f.image_folder:
      config.data.source, config.data.image_root = "image_folder", f.image_folder
    if f.shots:
      config.data.shots = f.shots
    if f.steps:
      config.total_steps = config.eval_every = config.checkpoint_every = f.steps
    if f.backbone:
      config.init_from = (("base", f.backbone),)
    return config

  seeds = [int(s) for s in f.seeds]
  results = run(config_for, f.workdir, f.methods, seeds)
  config = config_for("coop")
  print(f"base-to-novel, {config.data.shots} shots, seeds {seeds} ({config.data.source})")
  print(table(results))


if __name__ == "__main__":
  flags.DEFINE_string("config", "configs/prompt_shapes.py", "Prompt-learning recipe; its argument names the method.")
  flags.DEFINE_string("workdir", None, "Runs and base_to_novel.json go here.", required=True)
  flags.DEFINE_list("methods", list(METHODS), "Methods to run.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Shot seeds.")
  flags.DEFINE_string("image_folder", "", "An ImageFolder tree (root/<class>/<image>) instead of the shapes classes.")
  flags.DEFINE_integer("shots", None, "Shots per base class (the recipe's by default).")
  flags.DEFINE_integer("steps", None, "Training steps per prompt run.")
  flags.DEFINE_string("backbone", "", "The two-tower run or export to adapt (the recipe's init_from 'base' by default).")
  cli.run(main)
