"""Supervised classification of the 48 colour x shape classes (`data.source="shapes_labels"`).

`config.model.kind` picks the classifier: "perceiver_io" (`PerceiverClassifier`: pixels or
patches with Fourier position features, latents, one output query) or "vit" (`model.image`, a
ViT with a dense head to the classes). The loss is the softmax cross-entropy; the evaluator
reports accuracy on held-apart images (`shapes.class_images`, `evals.per_class` per class), and
the accuracy of their colour and of their shape read off the predicted class.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.data import shapes
from mmjax.data.transforms import NormalizeImage, ResizeImage
from mmjax.errors import ConfigError
from mmjax.evals import in_chunks
from mmjax.models import resolve_tower
from mmjax.models.perceiver import PerceiverClassifier
from mmjax.models.vit import ViT

KINDS = ("perceiver_io", "vit")


def build_classifier(model_config, num_classes: int):
  """The classifier module named by `model_config["kind"]`, mapping NHWC images to `[batch, num_classes]`."""
  cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  kind = cfg.get("kind")
  if kind == "perceiver_io":
    perceiver = dict(cfg["perceiver"])
    perceiver.update(dtype=jnp.dtype(cfg.get("dtype", "float32")), attention_impl=cfg.get("attention_impl", "xla"))
    return PerceiverClassifier(num_classes=num_classes, patch_size=cfg["patch_size"], num_bands=cfg["num_bands"],
                               perceiver=perceiver)
  if kind == "vit":
    kw = resolve_tower(cfg, "image")
    kw["dtype"] = jnp.dtype(kw["dtype"])
    kw.update(num_classes=num_classes, head="dense")
    return ViTClassifier(kw)
  raise ConfigError(f"model.kind={kind!r}: expected one of {KINDS}")


class ViTClassifier(nn.Module):
  """A ViT whose dense head gives the logits."""
  tower: dict

  @nn.compact
  def __call__(self, image, train=False):
    return ViT(**self.tower, name="vit")(image, train=train, pooled_only=True)[0]


class ClassificationTask:
  tokenizer = None
  max_len = None

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    if config.data.source != "shapes_labels":
      raise ConfigError(f"task 'classification' reads data.source='shapes_labels', not {config.data.source!r}")
    self.num_classes = len(shapes.CLASSES)
    self.model = build_classifier(config.model, self.num_classes)
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
