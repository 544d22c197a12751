"""VQA on the shapes scenes as classification over the answers, for comparing fusion baselines.

Each example is an image, its question as text (`data.source="shapes_vqa_labels"`) and the
answer's id in `shapes_vqa.ANSWERS`; `model.fusion` picks early, model-level (cross-attention)
or late fusion (`mmjax.models.fusion`). The loss is the softmax cross-entropy; the evaluator
reports accuracy on held-apart questions, overall and per question type.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax import models
from mmjax.config import as_dict
from mmjax.data import shapes_vqa
from mmjax.data.tokenizer import load_tokenizer
from mmjax.data.transforms import NormalizeImage, ResizeImage, Tokenize
from mmjax.errors import ConfigError
from mmjax.evals import in_chunks
from mmjax.tasks.base import Task


class FusionTask(Task):

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    if config.data.source != "shapes_vqa_labels":
      raise ConfigError(f"task 'fusion' reads data.source='shapes_vqa_labels', not {config.data.source!r}")
    if config.model.get("kind") not in (None, "fusion"):
      raise ConfigError(f"model.kind={config.model.kind!r}: task 'fusion' builds model.kind='fusion'")
    self.tokenizer = load_tokenizer(config.data.tokenizer)
    self.max_len = config.data.max_len
    cfg = as_dict(config.model)
    # The image size is recorded for exports: the ViT's learned position embeddings fix it.
    text = {**cfg.get("text", {}), "vocab_size": self.tokenizer.vocab_size, "max_len": self.max_len}
    self.model_config = {**cfg, "kind": "fusion", "num_classes": len(shapes_vqa.ANSWERS), "text": text,
                         "image_size": config.data.image_size}
    self.model = models.build(self.model_config)
    self._predict = jax.jit(lambda p, image, text: jnp.argmax(self.model.apply({"params": p}, image, text), axis=-1))
    self._eval = None

  def data_ops(self) -> list:
    return [ResizeImage(self.config.data.image_size), NormalizeImage(), Tokenize(self.tokenizer, self.max_len)]

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    size = self.config.data.image_size
    return {"image": np.zeros((batch_size, size, size, 3), np.float32),
            "text": np.zeros((batch_size, self.max_len), np.int32), "label": np.zeros((batch_size,), np.int32),
            "kind": np.zeros((batch_size,), np.int32)}

  def init(self, rng, batch):
    return self.model.init(rng, batch["image"], batch["text"])["params"]

  def loss_fn(self, params, batch, rng, train=True):
    logits = self.model.apply({"params": params}, batch["image"], batch["text"], train=train, rngs={"dropout": rng})
    loss = optax.losses.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"]).mean()
    return loss, {"loss": loss, "acc": jnp.mean(jnp.argmax(logits, axis=-1) == batch["label"])}

  def evaluate(self, params) -> dict[str, float]:
    """`{"vqa_acc", "vqa_acc/<type>"}` on `evals.n` questions of the evaluation stream."""
    if self._eval is None:
      d = self.config.data
      records = shapes_vqa.eval_set(d.seed, d.image_size, self.config.evals.n, d.held_out_fraction)
      examples = [shapes_vqa.labelled(r) for r in records]
      self._eval = (np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1.0,
                    self.tokenizer.encode([e["caption"] for e in examples], self.max_len),
                    np.array([e["label"] for e in examples]), np.array([e["kind"] for e in examples]))
    images, texts, labels, kinds = self._eval
    predicted = in_chunks(functools.partial(self._predict, params), (images, texts), self.config.evals.batch_size)
    correct = predicted == labels
    results = {"vqa_acc": float(correct.mean())}
    for i, kind in enumerate(shapes_vqa.QUESTION_TYPES):
      results[f"vqa_acc/{kind}"] = float(correct[kinds == i].mean())
    return results
