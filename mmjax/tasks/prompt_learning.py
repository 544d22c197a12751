"""Prompt learning on a frozen two-tower model: CoOp, CoCoOp, MaPLe, CoPrompt (`config.prompt`).

Parameters are `{"base": the two-tower model's, "prompt": the learner's}`, plus "adapter" when
`config.adapt` adapts the model's weights (LoRA with `prompt.method="template"`: CLIP-LoRA);
recipes start "base" from a trained run (`init_from`) and freeze it (`optim.frozen = ("^base/",)`). Batches
are k-shot images of the base classes (`mmjax.data.classes`); the loss is the cross-entropy of
the logits t·zimg·ztxtᵀ over the base classes' prompted text embeddings (t: the model's own
logit scale), plus CoPrompt's consistency term. The evaluator reports base-to-novel accuracy:
test images of base classes classified among the base classes, of novel classes among the
novel classes (with the learned context), and their harmonic mean.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax import models
from mmjax.adapt import wrap as adapt
from mmjax.adapt.prompts import PromptLearner, prompt_tokens
from mmjax.data import classes
from mmjax.data.shapes import CLASS_TEMPLATES
from mmjax.data.tokenizer import load_tokenizer
from mmjax.data.transforms import NormalizeImage, ResizeImage
from mmjax.errors import ConfigError
from mmjax.evals import in_chunks
from mmjax.tasks.base import Task
from mmjax.tasks.contrastive import model_config_with_vocab

BASE, PROMPT = "base", "prompt"


def harmonic_mean(a: float, b: float) -> float:
  return 2 * a * b / (a + b) if a + b else 0.0


def _cosine_distance(a, b):
  return jnp.mean(1.0 - jnp.sum(a * b, axis=-1))


class PromptLearningTask(Task):
  """Builds the frozen model, the prompt learner, the k-shot data and the base-to-novel evaluator."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.tokenizer = load_tokenizer(config.data.tokenizer)
    self.model_config = model_config_with_vocab(config.model, self.tokenizer)
    self.model_config["image_size"] = config.data.image_size
    self.model = adapt.wrap_for_task(models.build(self.model_config), config, self.model_config)
    self.adapted = bool(config.adapt.method)
    self.max_len = self.model_config["text"]["max_len"]
    self.learner = PromptLearner(self.model_config, config.prompt.to_dict(), self.tokenizer)
    self.data = classes.load(config.data)
    names = self.data.class_names
    m = self.learner.num_context
    self.tokens = {split: prompt_tokens(self.tokenizer, [names[c] for c in ids], m, self.max_len)
                   for split, ids in (("base", self.data.base), ("novel", self.data.novel))}
    # Training labels are class ids; the loss indexes the base classes.
    self.base_index = np.full(len(names), -1, np.int32)
    self.base_index[self.data.base] = np.arange(len(self.data.base))
    if self.learner.consistency:
      templates = [t.format(names[c]) for c in self.data.base for t in CLASS_TEMPLATES]
      self.template_tokens = self.tokenizer.encode(templates, self.max_len)
    self._eval_fns = None

  def data_ops(self) -> list:
    return [ResizeImage(self.config.data.image_size), NormalizeImage()]

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    size = self.config.data.image_size
    return {"image": np.zeros((batch_size, size, size, 3), np.float32),
            "label": np.full((batch_size,), self.data.base[0], np.int32)}

  def init(self, rng, batch):
    base_rng, prompt_rng = jax.random.split(rng)
    model = self.model.init(base_rng, image=batch["image"], text=jnp.asarray(self.tokens["base"][:1]))["params"]
    prompt = self.learner.init(prompt_rng, len(self.data.base))  # Small: replicated.
    prompt = jax.tree.map(lambda x: nn.Partitioned(x, names=(None,) * x.ndim), prompt)
    return {**(model if self.adapted else {BASE: model}), PROMPT: prompt}

  def model_params(self, params):
    """What `self.model.apply` takes: the two-tower's parameters, or {"base", "adapter"} with LoRA."""
    return {k: params[k] for k in (BASE, adapt.ADAPTER)} if self.adapted else params[BASE]

  def class_logits(self, params, images, split: str):
    """`(logits [B, C_split], zimg, ztxt)`: CoCoOp encodes every class prompt once per image."""
    base, prompt = self.model_params(params), params[PROMPT]
    zimg, aux = self.learner.encode_images(self.model, prompt, base, images)
    tokens = jnp.asarray(self.tokens[split])
    if self.learner.method == "cocoop":
      b, c = zimg.shape[0], tokens.shape[0]
      rows = jnp.tile(tokens, (b, 1))
      ztxt = self.learner.encode_texts(self.model, prompt, base, rows, jnp.repeat(zimg, c, axis=0))
      ztxt = ztxt.reshape(b, c, -1)
      logits = jnp.einsum("bd,bcd->bc", zimg, ztxt)
    else:
      if self.learner.class_specific and split != "base":
        raise ConfigError("prompt.class_specific context exists for the base classes only; novel "
                          "classes cannot be scored (use shared context)")
      ztxt = self.learner.encode_texts(self.model, prompt, base, tokens)
      logits = zimg @ ztxt.T
    return aux["t"] * logits, zimg, ztxt

  def loss_fn(self, params, batch, rng, train=True):
    del rng, train
    logits, zimg, ztxt = self.class_logits(params, batch["image"], "base")
    labels = jnp.asarray(self.base_index)[batch["label"]]
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    metrics = {"ce": ce, "acc": jnp.mean(jnp.argmax(logits, axis=1) == labels)}
    loss = ce
    if self.learner.consistency:
      base = jax.lax.stop_gradient(params[BASE])  # The frozen model: no adapter.
      frozen = self.model.base if self.adapted else self.model
      frozen_img, _, _ = frozen.apply({"params": base}, image=batch["image"])
      _, frozen_txt, _ = frozen.apply({"params": base}, text=jnp.asarray(self.template_tokens))
      frozen_txt = frozen_txt.reshape(len(self.data.base), len(CLASS_TEMPLATES), -1).mean(axis=1)
      frozen_txt = frozen_txt / jnp.linalg.norm(frozen_txt, axis=-1, keepdims=True)
      consistency = _cosine_distance(zimg, frozen_img) + _cosine_distance(ztxt, frozen_txt)
      metrics["consistency"] = consistency
      loss = loss + self.learner.consistency * consistency
    metrics["loss"] = loss
    return loss, metrics

  def predictions(self, params, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`(predicted, true)` class indices within `split` ("base" or "novel") for its test images."""
    if self._eval_fns is None:
      self._eval_fns = {s: jax.jit(lambda p, x, s=s: jnp.argmax(self.class_logits(p, x, s)[0], axis=1))
                        for s in ("base", "novel")}
    images, labels = self.data.test_set(split)
    predict = functools.partial(self._eval_fns[split], params)
    return in_chunks(predict, (images.astype(np.float32) / 127.5 - 1.0,), self.config.evals.batch_size), labels

  def evaluate(self, params) -> dict[str, float]:
    """`{"base_acc", "novel_acc", "hm"}` on the held-apart test images (see the module docstring)."""
    results = {}
    for split in ("base", "novel") if not self.learner.class_specific else ("base",):
      predicted, labels = self.predictions(params, split)
      results[f"{split}_acc"] = float(np.mean(predicted == labels))
    if "novel_acc" in results:
      results["hm"] = harmonic_mean(results["base_acc"], results["novel_acc"])
    if self.data.skipped:
      results["data/skipped_files"] = self.data.skipped
    return results
