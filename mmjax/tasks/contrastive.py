"""Contrastive image-text training (CLIP softmax or SigLIP sigmoid loss) and its evaluators."""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from mmjax import bundle, losses, models, parallel
from mmjax.adapt import wrap as adapt
from mmjax.config import as_dict
from mmjax.data import locca, packing, pipeline, shapes
from mmjax.data.tokenizer import load_saved_tokenizer, load_tokenizer
from mmjax.data.transforms import (NaFlexPatches, NormalizeImage, RandomBudgetPatches, RandomLocalView, ResizeImage,
                                   Tokenize)
from mmjax.errors import ConfigError
from mmjax.evals import benchmarks, binding, dense, embed_rows, grounding, recall, zeroshot
from mmjax.models.text import TextTransformer
from mmjax.models.vit import SINGLE_TOKEN_POOLS
from mmjax.tasks.base import Task, benchmark_entries, shapes_evals

LOSSES = ("sigmoid", "softmax", "infonce", "triplet")
TEMPLATE_SETS = {"shapes": shapes.CLASS_TEMPLATES, "plain": ("{}",)}
SHAPES_EVALS = ("zeroshot", "retrieval", "binding", "aspect", "dense", "grounding")


def init_tokenizer(config):
  """`data.tokenizer`, where "from_init" is the tokenizer saved with the export that `init_from`
  starts the whole model ("") or the adapted model's base ("base") from: a converted CLIP's BPE or a
  SigLIP's SentencePiece, with its padding and cleaning rules."""
  if config.data.tokenizer != "from_init":
    return load_tokenizer(config.data.tokenizer)
  sources = [entry[1] for entry in config.get("init_from", ()) if entry[0] in ("", adapt.BASE)]
  for source in sources:
    if os.path.exists(os.path.join(source, bundle.TOKENIZER)):
      return load_saved_tokenizer(source)
  raise ConfigError(f"data.tokenizer='from_init': no export with a tokenizer among the whole-model init_from "
                    f"sources {sources} (init_from=(('', EXPORT),), or ('base', EXPORT) with adapt.method)")


def model_config_with_vocab(model_config, tokenizer) -> dict:
  """`config.model` as a dict, with `text.vocab_size` taken from the tokenizer when unset."""
  cfg = as_dict(model_config)
  cfg["text"] = dict(cfg["text"])
  vocab = cfg["text"].get("vocab_size")
  if vocab is None:
    cfg["text"]["vocab_size"] = tokenizer.vocab_size
  elif vocab < tokenizer.vocab_size:
    raise ConfigError(f"model.text.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size}")
  return cfg


def locca_losses(logits, tokens, segments, weights) -> dict[str, jax.Array]:
  """LocCa's cross-entropy (`locca/loss`) and each task's (`locca/caption`, ...): position i of
  `logits` [images, seq, vocab] predicts token i + 1 of `tokens`, weighted by `weights` (which are 0 at
  each sequence's first token, so no sequence predicts the next one's)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
  weights, segments = weights[:, 1:], segments[:, 1:]
  out = {"locca/loss": (ce * weights).sum() / jnp.maximum(weights.sum(), 1.0)}
  for i, name in enumerate(locca.TASKS):
    task_weights = weights * (segments == i + 1)
    out[f"locca/{name}"] = (ce * task_weights).sum() / jnp.maximum(task_weights.sum(), 1.0)
  return out


def locca_inputs(batch) -> dict | None:
  """The LocCa decoder's inputs of a batch, None when it has none."""
  return {"tokens": batch["locca"], "segments": batch["locca_segments"]} if "locca" in batch else None


class ContrastiveTask(Task):
  """Builds the two-tower model, its loss and its evaluators from the config."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    if config.loss.kind not in LOSSES:
      raise ConfigError(f"loss.kind={config.loss.kind!r}; use one of {LOSSES}")
    self.tokenizer = init_tokenizer(config)
    self.model_config = model_config_with_vocab(config.model, self.tokenizer)
    # Recorded for exports: learned position embeddings fix the input resolution; a NaFlex tower's
    # images take their patch budget.
    self.model_config["image_size"] = config.data.image_size
    self.naflex = bool(self.model_config["image"].get("naflex"))
    if self.naflex:
      if config.data.get("max_patches", 0) < 1:
        raise ConfigError("model.image.naflex needs data.max_patches, the patches per image (e.g. 256)")
      self.model_config["max_patches"] = config.data.max_patches
      budgets = tuple(config.data.get("patch_budgets", ()))
      if not all(1 <= b <= config.data.max_patches for b in budgets):
        raise ConfigError(f"data.patch_budgets={budgets}: each must lie in [1, data.max_patches="
                          f"{config.data.max_patches}]")
    self._init_locca()
    self._init_distill()
    self.model = adapt.wrap_for_task(models.build(self.model_config), config, self.model_config)
    self.max_len = self.model_config["text"]["max_len"]
    # With data.pack_text: the text tower as the model builds it (unset fields take its defaults).
    self._packing_tower = None
    if config.data.get("pack_text"):
      self._packing_tower = TextTransformer(**models.resolve_tower(self.model_config, "text"))
      packing.check_packable(self._packing_tower.causal, self._packing_tower.pool, "data.pack_text with model.text")
      # Runs saved before data.captions_per_row existed packed two per row.
      self._captions_per_row = self._per_row("captions_per_row", 2)
    self._images_per_row = None
    if config.data.get("pack_images"):
      if not self.naflex:
        raise ConfigError("data.pack_images packs NaFlex patch sequences: it needs model.image.naflex")
      self._images_per_row = self._per_row("images_per_row", 4)
    if self._packing_tower is not None or self._images_per_row:
      divisor, processes = parallel.batch_size_divisor(mesh), jax.process_count()
      if divisor % processes:
        raise ConfigError(f"data.pack_text / pack_images: the batch is split over {divisor} devices, which "
                          f"{processes} processes cannot share evenly")
      self._rows_divisor = divisor // processes  # Each process's row count is a multiple of its devices.
    # Replicated outputs: every process reads all embeddings of the rows it fed a slice of.
    self._embed = jax.jit(lambda p, image, text: self.model.apply({"params": p}, image=image, text=text)[:2],
                          out_shardings=parallel.replicated(mesh))
    self._eval_data = None

  def _init_locca(self) -> None:
    """LocCa (`loss.decoder_weight` > 0 with `model.locca`): the decoder's vocabulary and sequence length.
    Without the loss the model is built without the decoder."""
    self.decoder_weight = float(self.config.loss.get("decoder_weight", 0.0))
    if not self.decoder_weight:
      self.model_config.pop("locca", None)
      return
    if not self.model_config.get("locca"):
      raise ConfigError(f"loss.decoder_weight={self.decoder_weight} trains LocCa's decoder: set model.locca "
                        "(width, depth, mlp_dim, num_heads, max_len, box_bins)")
    if self.model_config["image"].get("arch", "vit") != "vit":
      raise ConfigError("loss.decoder_weight: LocCa's decoder reads a ViT image tower's patches; not a Swin's")
    if pipeline.augmentation(self.config.data) is not None:
      raise ConfigError("loss.decoder_weight: LocCa's boxes do not follow data.augment's crops and flips; "
                        "train it without data.augment")
    self.locca_vocab = locca.LocCaVocab(self.model_config["text"]["vocab_size"], self.model_config["locca"]["box_bins"])
    self.locca_len = self.model_config["locca"]["max_len"]
    if self.locca_len < locca.MIN_LEN:
      raise ConfigError(f"model.locca.max_len={self.locca_len}: the three packed sequences need at least "
                        f"{locca.MIN_LEN} tokens")

  def _init_distill(self) -> None:
    """Self-distillation and masked prediction (`loss.distill`), when either weight is set."""
    d = self.config.loss.get("distill")
    self.distill = d if d is not None and (d.weight or d.masked_weight) else None
    if self.distill is None:
      return
    where = "loss.distill"
    if self.model_config["image"].get("arch", "vit") != "vit" or self.config.adapt.get("method"):
      raise ConfigError(f"{where}: distils a ViT image tower's own parameters; not a Swin tower or an adapted model")
    if not (0 <= d.start < 1 and 0 < d.ema_decay < 1 and 0 < d.mask_ratio < 1):
      raise ConfigError(f"{where}: need 0 <= start < 1, 0 < ema_decay < 1 and 0 < mask_ratio < 1; got start="
                        f"{d.start}, ema_decay={d.ema_decay}, mask_ratio={d.mask_ratio}")
    if self.naflex and d.local_patches < 1:
      raise ConfigError(f"{where}.local_patches={d.local_patches}: a NaFlex local view needs at least one patch")
    self._distill_start = int(round(d.start * self.config.total_steps))

  def teacher(self) -> tuple[str, float] | None:
    """Distillation's teacher: an EMA of the image tower."""
    return None if self.distill is None else ("img", float(self.distill.ema_decay))

  def for_export(self, params) -> tuple[dict, Any]:
    """The model config and parameters an export keeps: LocCa's decoder trains the image tower and goes."""
    if "locca" not in self.model_config:
      return self.model_config, params
    return ({k: v for k, v in self.model_config.items() if k != "locca"},
            {k: v for k, v in params.items() if k != "locca"})

  def source(self, data_config):
    """The training source; with LocCa, its records carry their regions (text and box)."""
    if self.decoder_weight:
      data_config = ml_collections.ConfigDict({**as_dict(data_config), "regions": True})
    return pipeline.make_source(data_config)

  def _per_row(self, key: str, default: int) -> int:
    per_row = self.config.data.get(key, default)
    if per_row < 1:
      raise ConfigError(f"data.{key} must be at least 1; got {per_row}")
    return per_row

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    _, blank = benchmarks.image_input(self.model_config)
    image = jax.tree.map(lambda x: np.zeros((batch_size,) + x.shape, x.dtype), blank)
    batch = {"image": image, "text": np.zeros((batch_size, self.max_len), np.int32)}
    if self.decoder_weight:
      shape = (batch_size, self.locca_len)
      batch.update(locca=np.zeros(shape, np.int32), locca_segments=np.zeros(shape, np.int32),
                   locca_weights=np.zeros(shape, np.float32))
    if self.distill is not None:
      local = self._local_view().random_map({"image": np.zeros((8, 8, 3), np.uint8)}, np.random.default_rng(0))
      batch["image_local"] = jax.tree.map(lambda x: np.zeros((batch_size,) + x.shape, x.dtype), local["image_local"])
    return batch

  def _local_view(self):
    d, patch_size = self.distill, models.resolve_tower(self.model_config, "image")["patch_size"]
    return RandomLocalView(tuple(d.local_scale), self.config.data.image_size, patch_size,
                           d.local_patches if self.naflex else 0)

  def _patch_count(self, image) -> int:
    """Patches per row of an image batch as the image tower takes it."""
    if self.naflex:
      return image["patches"].shape[1]
    patch_size = models.resolve_tower(self.model_config, "image")["patch_size"]
    return (image.shape[1] // patch_size) * (image.shape[2] // patch_size)

  def data_ops(self) -> list | None:
    """NaFlex: each image at its own aspect ratio as patches (after any `data.augment`), instead of the
    loader's square resize. LocCa: the decoder's targets (`mmjax.data.locca`), from the image as loaded."""
    if not self.naflex and not self.decoder_weight and self.distill is None:
      return None
    ops = list(pipeline.augmentation(self.config.data) or [])
    if self.decoder_weight:
      ops.append(locca.LocCaTargets(self.tokenizer, self.locca_vocab, self.locca_len, square_crop=not self.naflex))
    if self.distill is not None:
      ops.append(self._local_view())
    if self.naflex:
      patch_size, length = models.resolve_tower(self.model_config, "image")["patch_size"], self.config.data.max_patches
      budgets = tuple(self.config.data.get("patch_budgets", ()))
      ops.append(RandomBudgetPatches(patch_size, budgets, length) if budgets else NaFlexPatches(patch_size, length))
    else:
      ops += [ResizeImage(self.config.data.image_size), NormalizeImage()]
    return ops + [Tokenize(self.tokenizer, self.max_len)]

  def prepare_batch(self, local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The loader's batch as the step takes it: with `data.pack_text`, captions packed up to
    `data.captions_per_row` per row, and with `data.pack_images`, NaFlex images up to
    `data.images_per_row` per row (`mmjax.data.packing`)."""
    processes = jax.process_count()
    agree = lambda rows: int(np.max(multihost_utils.process_allgather(np.int32(rows)))) if processes > 1 else rows
    batch = dict(local)
    if self._packing_tower is not None:
      lengths = packing.pooled_lengths(local["text"], self._packing_tower.pool, self._packing_tower.eos_id)
      packed = packing.pack_captions(local["text"], lengths, self._captions_per_row, self._rows_divisor, agree)
      packed["text_slot"] += self._captions_per_row * parallel.local_rows_start(self.mesh,
                                                                                len(packed["text"]) * processes)
      batch.update(packed)
    if self._images_per_row:
      packed = packing.pack_images(local["image"], self._images_per_row, self._rows_divisor, agree)
      rows = len(packed["image"]["grid"])
      packed["image_slot"] += self._images_per_row * parallel.local_rows_start(self.mesh, rows * processes)
      batch.update(packed)
    return batch

  def init(self, rng, batch):
    """Parameters boxed with their logical axis names (unbox before use)."""
    mask = None
    if self.distill is not None:
      mask = np.zeros((len(batch["text"]), self._patch_count(batch["image"])), bool)
    return self.model.init(rng, image=batch["image"], text=batch["text"], locca=locca_inputs(batch),
                           image_mask=mask)["params"]

  def loss_fn(self, params, batch, rng, train=True, teacher=None, step=None) -> tuple[jax.Array, dict]:
    """The contrastive loss, plus LocCa's (`loss.decoder_weight`) and, given the `teacher`'s parameters
    from step `loss.distill.start * total_steps` on, self-distillation's and masked prediction's."""
    zimg, ztxt, aux = self.model.apply({"params": params}, image=batch["image"], text=batch["text"],
                                       text_packing=packing.model_fields(batch), image_slot=batch.get("image_slot"),
                                       locca=locca_inputs(batch), train=train, rngs={"dropout": rng})
    spec = self.config.loss
    negatives = spec.num_negatives or None
    if spec.kind == "sigmoid":
      if "b" not in aux:
        raise ConfigError("loss.kind='sigmoid' needs a logit bias: set model.bias_init (e.g. -10.0)")
      loss = losses.sigmoid_loss(zimg, ztxt, aux["t"], aux["b"], mesh=self.mesh, impl=spec.impl)
    elif spec.kind == "softmax":
      loss = losses.softmax_loss(zimg, ztxt, aux["t"], mesh=self.mesh)
    elif spec.kind == "infonce":
      loss = losses.infonce_loss(zimg, ztxt, aux["t"], num_negatives=negatives, mesh=self.mesh)
    else:
      loss = losses.triplet_loss(zimg, ztxt, margin=spec.margin, num_negatives=negatives, hardest=spec.hardest,
                                 mesh=self.mesh)
    metrics = {"loss": loss, "t": aux["t"]}
    if "b" in aux:
      metrics["b"] = aux["b"]
    if self.decoder_weight:
      metrics.update(locca_losses(aux["locca/logits"], batch["locca"], batch["locca_segments"],
                                  batch["locca_weights"]))
      metrics["contrastive_loss"] = loss
      loss = metrics["loss"] = loss + self.decoder_weight * metrics["locca/loss"]
    if self.distill is not None and teacher is not None:
      zero = jnp.zeros((), jnp.float32)
      terms = jax.lax.cond(step >= self._distill_start,
                           lambda: self._distill_losses(params, teacher, batch, rng, train),
                           lambda: {"distill/global": zero, "distill/masked": zero})
      metrics.update(terms)
      metrics.setdefault("contrastive_loss", loss)
      loss = metrics["loss"] = (loss + self.distill.weight * terms["distill/global"]
                                + self.distill.masked_weight * terms["distill/masked"])
    return loss, metrics

  def _distill_losses(self, params, teacher, batch, rng, train) -> dict[str, jax.Array]:
    """`distill/global`: 1 - cos between the student's embedding of each image's local view and the
    teacher's of the whole image. `distill/masked`: 1 - cos between the student's and the teacher's
    output at the image's patches the student saw masked, averaged over them."""
    slot = {"image_slot": batch.get("image_slot")}
    zteacher, _, teacher_aux = self.model.apply({"params": {**params, "img": teacher}}, image=batch["image"],
                                                patch_tokens=True, **slot)
    zteacher, teacher_tokens = jax.lax.stop_gradient((zteacher, teacher_aux["img/encoded"]))
    rngs = {"dropout": jax.random.fold_in(rng, 1)}
    zlocal = self.model.apply({"params": params}, image=batch["image_local"], train=train, rngs=rngs)[0]
    rows, patches = teacher_tokens.shape[0], self._patch_count(batch["image"])
    mask = jax.random.bernoulli(jax.random.fold_in(rng, 2), self.distill.mask_ratio, (rows, patches))
    student_aux = self.model.apply({"params": params}, image=batch["image"], image_mask=mask, patch_tokens=True,
                                   train=train, rngs=rngs, **slot)[2]
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)
    # The patches are the last tokens (a class token comes first); NaFlex padding is no image's.
    cos = jnp.sum(unit(student_aux["img/encoded"][:, -patches:]) * unit(teacher_tokens[:, -patches:]), axis=-1)
    if "img/segments" in teacher_aux:
      mask = mask & (teacher_aux["img/segments"] > 0)
    masked = jnp.sum((1 - cos) * mask) / jnp.maximum(jnp.sum(mask), 1)
    return {"distill/global": jnp.mean(1 - jnp.sum(zlocal * zteacher, axis=-1)), "distill/masked": masked}

  # Evaluation -------------------------------------------------------------------------

  def embedder(self, params, cache_dir: str | None = None) -> benchmarks.Embedder:
    """The model with `params` as a benchmark embeds with: evals.batch_size rows at a time over every
    device and process (`mmjax.evals.embed_rows`)."""
    prepare, blank = benchmarks.image_input(self.model_config)
    return benchmarks.Embedder(
        encode_image=lambda x: self._embed(params, x, None)[0], encode_text=lambda t: self._embed(params, None, t)[1],
        tokenize=lambda texts: self.tokenizer.encode(texts, self.max_len), prepare_image=prepare, blank_image=blank,
        mesh=self.mesh, batch_size=self.config.evals.batch_size, cache_dir=cache_dir)

  def embed_images(self, params, images: np.ndarray) -> np.ndarray:
    """Embeddings of uint8 images [N, H, W, 3], prepared as the model takes them."""
    return self.embedder(params).images(lambda i: images[i], len(images), "images")[0]

  def embed_texts(self, params, texts: list[str]) -> np.ndarray:
    return self.embedder(params).texts(texts, "texts")

  def _aspect_robustness(self, params, sets: dict[float, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """`aspect/acc_r{ratio}` (`_p{budget}`): zero-shot accuracy over all classes on images `ratio` times as
    wide as high, which a fixed-resolution tower sees centre-cropped and a NaFlex tower whole, at each
    patch budget of `evals.aspect.budgets` (default: its training budget)."""
    e = self.config.evals.aspect
    zclass = zeroshot.class_embeddings(lambda t: self.embed_texts(params, t), shapes.CLASS_NAMES,
                                       TEMPLATE_SETS[e.templates])
    budgets = (tuple(e.budgets) or (self.config.data.max_patches,)) if self.naflex else (None,)
    results = {}
    for budget in budgets:
      embedder = self.embedder(params)
      if budget is not None:
        embedder = benchmarks.at_patch_budget(embedder, self.model_config, budget)
      for ratio, (images, labels) in sets.items():
        zimg = embedder.images(lambda i, images=images: images[i], len(images), "images")[0]
        key = f"aspect/acc_r{ratio:g}" + ("" if budget is None else f"_p{budget}")
        results[key] = zeroshot.evaluate(zimg, zclass, labels)["acc"]
    return results

  def _eval_sets(self) -> dict[str, Any]:
    if self._eval_data is None:
      d, e = self.config.data, self.config.evals
      synthetic = shapes_evals(e, SHAPES_EVALS)
      if synthetic and d.source != "shapes":
        raise ConfigError(f"evals {synthetic} need data.source='shapes'; remove them from config.evals, or "
                          "evaluate on your data with benchmark entries (evals.<name>.benchmark, README)")
      kw = dict(seed=d.seed, image_size=d.image_size, held_out_fraction=d.held_out_fraction)
      self._eval_data = {}
      if "zeroshot" in synthetic:
        self._eval_data["zeroshot"] = shapes.zeroshot_set(per_class=e.zeroshot.per_class, **kw)
      if "retrieval" in synthetic:
        self._eval_data["retrieval"] = shapes.retrieval_set(n=e.retrieval.n, **kw)
      if "binding" in synthetic:
        self._eval_data["binding"] = shapes.binding_set(n=e.binding.n, **kw)
      if "aspect" in synthetic:  # The zero-shot scenes, on canvases of each aspect ratio.
        self._eval_data["aspect"] = {
            float(ratio): shapes.class_images(range(len(shapes.CLASSES)), e.aspect.per_class, d.seed,
                                              shapes.aspect_size(d.image_size, float(ratio)))
            for ratio in e.aspect.ratios}
      if "grounding" in synthetic:
        if not self.decoder_weight:
          raise ConfigError("evals.grounding decodes boxes with LocCa's decoder: set loss.decoder_weight and "
                            "model.locca, or remove evals.grounding")
        self._eval_data["grounding"] = shapes.grounding_set(d.seed, d.image_size, e.grounding.n,
                                                            d.held_out_fraction)
      if "dense" in synthetic:  # Scenes and each patch's class, on the grid the tower sees them at.
        grid = self._dense_grid()
        self._eval_data["dense"] = {}
        for split in ("train", "test"):
          scenes = shapes.dense_set(d.seed, d.image_size, e.dense[f"n_{split}"], split)
          self._eval_data["dense"][split] = (scenes["images"], dense.patch_labels(scenes["labels"], grid).reshape(-1))
    return self._eval_data

  def _dense_grid(self) -> tuple[int, int]:
    """The patch grid of a square `data.image_size` image as the image tower sees it."""
    tower = models.resolve_tower(self.model_config, "image")
    if tower.get("pool") in SINGLE_TOKEN_POOLS:
      raise ConfigError(f"evals.dense reads every patch's features; model.image.pool={tower['pool']!r} computes the "
                        "last block for its pooled token only")
    size = self.config.data.image_size
    if self.naflex:
      prepare, _ = benchmarks.image_input(self.model_config)
      return tuple(int(n) for n in prepare(np.zeros((size, size, 3), np.uint8))["grid"])
    return (size // tower["patch_size"],) * 2

  @functools.cached_property
  def _patch_features(self):
    """Jitted `(params, images) -> [batch, patches * width]`: the image tower's encoder output at each patch."""
    tokens = int(np.prod(self._dense_grid()))

    def patch_features(params, image):
      aux = self.model.apply({"params": params}, image=image)[2]
      if "img/encoded" not in aux:
        raise ConfigError("evals.dense needs a ViT image tower (model.image), whose encoder output it probes")
      # NaFlex: the image's patches come first; a fixed grid may start with a class token.
      x = aux["img/encoded"][:, :tokens] if self.naflex else aux["img/encoded"][:, -tokens:]
      return x.reshape(x.shape[0], -1)

    return jax.jit(patch_features, out_shardings=parallel.replicated(self.mesh))

  def _dense_probe(self, params, sets: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """`dense/miou`, `dense/patch_acc` (`mmjax.evals.dense`): a ridge probe on the frozen image tower's
    patch features (its encoder's output tokens) predicting each patch's class (background or one of
    the 48 classes) on `evals.dense.n_test` square scenes, fitted on `n_train` others."""
    prepare, blank = benchmarks.image_input(self.model_config)
    features = {}
    for split, (images, labels) in sets.items():
      z, _ = embed_rows(functools.partial(self._patch_features, params), lambda i, images=images: prepare(images[i]),
                        len(images), self.mesh, self.config.evals.batch_size, blank, what=f"{split} scenes")
      features[split] = z.reshape(len(labels), -1)  # One row per patch.
    metrics = dense.probe(features["train"], sets["train"][1], features["test"], sets["test"][1],
                          1 + len(shapes.CLASSES), l2=self.config.evals.dense.get("l2", 1e-3))
    return {f"dense/{k}": v for k, v in metrics.items()}

  @functools.cached_property
  def _decode_boxes(self):
    """Jitted `(params, dict(image, tokens [batch, seq], last [batch])) -> box bins [batch, 4]`: LocCa's
    decoder continues each referring prompt, ending at `last`, greedily over the box tokens."""
    vocab = self.locca_vocab

    def decode(params, x):
      tokens, last = x["tokens"], x["last"].astype(jnp.int32)
      rows, bins, segments = jnp.arange(tokens.shape[0]), [], jnp.ones_like(tokens)
      for i in range(locca.BOX_TOKENS):
        logits = self.model.apply({"params": params}, image=x["image"],
                                  locca={"tokens": tokens, "segments": segments})[2]["locca/logits"]
        scores = logits[rows, last + i, vocab.first_bin:vocab.first_bin + vocab.box_bins]
        bins.append(jnp.argmax(scores, axis=-1))
        tokens = tokens.at[rows, last + i + 1].set(vocab.first_bin + bins[-1])
      return jnp.stack(bins, axis=-1)

    return jax.jit(decode, out_shardings=parallel.replicated(self.mesh))

  def _grounding(self, params, gs: dict) -> dict[str, float]:
    """`grounding/acc@0.5`, `grounding/miou` and the centre-box baseline's `grounding/centre_acc@0.5` of
    the boxes LocCa's decoder gives for "the <colour> <shape>" on `evals.grounding.n` scenes."""
    prepare, blank = benchmarks.image_input(self.model_config)
    tokens, last = locca.referring_prompts(self.tokenizer, self.locca_vocab, gs["texts"], self.locca_len)
    rows = lambda i: dict(image=prepare(gs["images"][i]), tokens=tokens[i], last=last[i])
    bins, _ = embed_rows(functools.partial(self._decode_boxes, params), rows, len(tokens), self.mesh,
                         self.config.evals.batch_size, dict(image=blank, tokens=tokens[0], last=last[0]),
                         what="referring expressions")
    metrics = grounding.evaluate(self.locca_vocab.box_of_bins(bins), gs["boxes"])
    return {f"grounding/{k}": v for k, v in metrics.items()}

  def evaluate(self, params) -> dict[str, float]:
    """Every configured evaluator, as `{"zeroshot/acc_seen": ..., "retrieval/i2t_r@1": ...}`: the shapes
    evals and the benchmark entries (`evals.<name>.benchmark`)."""
    results = {}
    sets = self._eval_sets()
    if "zeroshot" in sets:
      zs = sets["zeroshot"]
      templates = TEMPLATE_SETS[self.config.evals.zeroshot.templates]
      zclass = zeroshot.class_embeddings(lambda t: self.embed_texts(params, t), zs["class_names"], templates)
      zimg = self.embed_images(params, zs["images"])
      groups = {"seen": zs["seen"], "held_out": ~zs["seen"]}
      results.update({f"zeroshot/{k}": v for k, v in zeroshot.evaluate(zimg, zclass, zs["labels"], groups).items()})
    if "retrieval" in sets:
      rs = sets["retrieval"]
      r = recall.evaluate(self.embed_images(params, rs["images"]), self.embed_texts(params, rs["captions"]))
      results.update({f"retrieval/{k}": v for k, v in r.items()})
    if "binding" in sets:
      bs = sets["binding"]
      r = binding.evaluate(self.embed_images(params, bs["images"]), self.embed_texts(params, bs["true_captions"]),
                           self.embed_texts(params, bs["swapped_captions"]))
      results.update({f"binding/{k}": v for k, v in r.items()})
    if "aspect" in sets:
      results.update(self._aspect_robustness(params, sets["aspect"]))
    if "dense" in sets:
      results.update(self._dense_probe(params, sets["dense"]))
    if "grounding" in sets:
      results.update(self._grounding(params, sets["grounding"]))
    for name, benchmark, data, options in benchmark_entries(self.config.evals):
      metrics = benchmarks.run(self.embedder(params), benchmark, data, **options)["metrics"]
      results.update({f"{name}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    return results
