"""Supervised classification of the 48 colour x shape classes (`data.source="shapes_labels"`).

`config.model.kind` picks the classifier (`mmjax.models.classifier`): "perceiver_io" or "vit".
The loss is the softmax cross-entropy; the evaluator reports accuracy on held-apart images
(`shapes.class_images`, `evals.per_class` per class), and the accuracy of their colour and of
their shape read off the predicted class.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax import models
from mmjax.config import as_dict
from mmjax.data import shapes
from mmjax.data.transforms import NormalizeImage, ResizeImage
from mmjax.errors import ConfigError
from mmjax.evals import in_chunks
from mmjax.models.classifier import KINDS
from mmjax.tasks.base import Task


class ClassificationTask(Task):
  tokenizer = None
  max_len = None

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    if config.data.source != "shapes_labels":
      raise ConfigError(f"task 'classification' reads data.source='shapes_labels', not {config.data.source!r}")
    if config.model.get("kind") not in KINDS:
      raise ConfigError(f"model.kind={config.model.get('kind')!r}: task 'classification' takes one of {KINDS}")
    self.num_classes = len(shapes.CLASSES)
    # The image size is recorded for exports: the ViT's learned position embeddings fix it.
    self.model_config = {**as_dict(config.model), "num_classes": self.num_classes,
                         "image_size": config.data.image_size}
    self.model = models.build(self.model_config)
    self._logits = jax.jit(lambda p, x: self.model.apply({"params": p}, x))
    self._test = None

  def data_ops(self) -> list:
    return [ResizeImage(self.config.data.image_size), NormalizeImage()]

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    size = self.config.data.image_size
    return {"image": np.zeros((batch_size, size, size, 3), np.float32), "label": np.zeros((batch_size,), np.int32)}

  def init(self, rng, batch):
    return self.model.init(rng, batch["image"])["params"]

  def loss_fn(self, params, batch, rng, train=True):
    logits = self.model.apply({"params": params}, batch["image"], train=train, rngs={"dropout": rng})
    loss = optax.losses.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"]).mean()
    return loss, {"loss": loss, "acc": jnp.mean(jnp.argmax(logits, axis=-1) == batch["label"])}

  def evaluate(self, params) -> dict[str, float]:
    if self._test is None:
      self._test = shapes.class_images(range(self.num_classes), self.config.evals.per_class,
                                       seed=self.config.data.seed, image_size=self.config.data.image_size)
    images, labels = self._test
    logits = in_chunks(functools.partial(self._logits, params), (images.astype(np.float32) / 127.5 - 1.0,),
                       self.config.evals.batch_size)
    predicted = np.argmax(logits, axis=-1)
    n_shapes = len(shapes.SHAPES)
    return {"acc": float(np.mean(predicted == labels)),
            "colour_acc": float(np.mean(predicted // n_shapes == labels // n_shapes)),
            "shape_acc": float(np.mean(predicted % n_shapes == labels % n_shapes))}
