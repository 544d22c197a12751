"""Next-token training of generative models: text-only LMs and vision-language models (VQA, captions).

`config.model.kind` picks the model: "lm" (a `Decoder`, trained on the text of the
episodes) or a vision-language model (`mmjax.models.vlm`): "llava", "flamingo" or "blip2".
Batches come from `mmjax.data.sequences.BuildSequence`; the loss is the cross-entropy of the
weighted (answer) tokens. Evaluators, by `config.evals`: `vqa` (exact match of greedy answers, with
the majority-answer baseline and per question type), `captioning` (BLEU-4, CIDEr) and
`few_shot` (VQA with k solved examples before the question, for models that take several
images).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from mmjax import bundle, losses, models, parallel
from mmjax.adapt import wrap as adapt
from mmjax.config import as_dict
from mmjax.data import shapes_vqa
from mmjax.data.tokenizer import END_OF_CHUNK, IMAGE_TOKEN, load_tokenizer
from mmjax.data.transforms import NormalizeImage
from mmjax.errors import ConfigError
from mmjax.evals import captioning, vlm_benchmarks, vqa
from mmjax.generate import answer, make_sequence
from mmjax.models.decoder import Decoder, expand_variant
from mmjax.index import image_similarity_selector, rag
from mmjax.tasks.base import Task, benchmark_entries, shapes_evals

KINDS = ("lm", "llava", "flamingo", "blip2")
SHAPES_EVALS = ("vqa", "described_vqa", "captioning", "few_shot")
# Training answers drawn to find the majority answer the VQA eval reports as its baseline.
_BASELINE_RECORDS = 2000


def model_config_with_tokens(model_config, tokenizer) -> dict:
  """`config.model` (kind "lm" or a vision-language kind) as a dict for `mmjax.models.build`: the LM's
  variant expanded, its vocabulary size the tokenizer's when unset, and the media token ids the
  tokenizer's (the image token; Flamingo's end-of-chunk token too)."""
  cfg = as_dict(model_config)
  kind = cfg.get("kind")
  if kind not in KINDS:
    raise ConfigError(f"model.kind={kind!r}: task 'generative' takes one of {KINDS}")
  if kind == "lm":
    cfg = lm = expand_variant(cfg)
  else:
    cfg["lm"] = lm = expand_variant(cfg.get("lm") or {})
    cfg["image_token_id"] = tokenizer.piece_id(IMAGE_TOKEN)
  if kind == "flamingo":
    cfg["end_of_chunk_id"] = tokenizer.piece_id(END_OF_CHUNK)
  lm.setdefault("vocab_size", tokenizer.vocab_size)
  return cfg


class GenerativeTask(Task):
  """Builds the model, its sequences, loss and evaluators from the config."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.tokenizer = load_tokenizer(config.data.tokenizer)
    self.model_config = model_config_with_tokens(config.model, self.tokenizer)
    base = models.build(self.model_config)
    self.is_lm = isinstance(base, Decoder)
    self.max_len = config.data.max_len
    self.sequence = make_sequence(base, self.tokenizer, self.max_len, config.data.get("loss_on"))
    self.model = adapt.wrap_for_task(base, config, self.model_config)
    self.media = config.data.get("media_per_record", 1)
    self._eval_data = None

  def source(self, data_config):
    """With `data.rag`, the training records with retrieved captions before their prompts
    (`mmjax.index.rag`); otherwise the source `data.source` names."""
    if data_config.get("rag"):
      return rag.training_source(data_config)
    return super().source(data_config)

  def data_ops(self) -> list:
    return ([] if self.is_lm else [NormalizeImage()]) + [self.sequence]

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    """A batch of empty episodes: black images, each with its image tokens and an empty answer."""
    size, m = self.config.data.image_size, self.media
    example = self.sequence.map(dict(image=np.zeros((m, size, size, 3), np.float32), prompts=[""] * m,
                                     answers=[""] * m))
    return {k: np.repeat(v[None], batch_size, axis=0) for k, v in example.items()}

  def _apply(self, params, batch, train=False, rng=None):
    rngs = {"dropout": rng} if rng is not None else {}
    if self.is_lm:
      return self.model.apply({"params": params}, batch["tokens"], mask=batch["mask"], train=train, rngs=rngs)
    return self.model.apply({"params": params}, batch["image"], batch["tokens"], mask=batch["mask"], train=train,
                            rngs=rngs)

  def init(self, rng, batch):
    """Parameters boxed with their logical axis names (unbox before use)."""
    if self.is_lm:
      return self.model.init(rng, batch["tokens"], mask=batch["mask"])["params"]
    return self.model.init(rng, batch["image"], batch["tokens"], mask=batch["mask"])["params"]

  def loss_fn(self, params, batch, rng, train=True) -> tuple[jax.Array, dict]:
    logits, _ = self._apply(params, batch, train=train, rng=rng)
    loss = losses.next_token_loss(logits, batch["targets"], batch["weights"])
    return loss, {"loss": loss}

  # Evaluation -------------------------------------------------------------------------

  def _eval_sets(self) -> dict[str, Any]:
    if self._eval_data is None:
      d, e = self.config.data, self.config.evals
      synthetic = shapes_evals(e, SHAPES_EVALS)
      if synthetic and d.source != "shapes_vqa":
        raise ConfigError(f"evals {synthetic} need data.source='shapes_vqa'; remove them from config.evals, or "
                          "evaluate on your data with benchmark entries (evals.<name>.benchmark, README)")
      kw = dict(seed=d.seed, image_size=d.image_size, held_out_fraction=d.held_out_fraction)
      self._eval_data = {}
      if "vqa" in synthetic:
        train = shapes_vqa.ShapesVQASource(caption_fraction=0.0, **kw)
        self._eval_data["vqa"] = shapes_vqa.eval_set(n=e.vqa.n, **kw)
        self._eval_data["vqa_train_answers"] = [train.record(i)["answer"] for i in range(_BASELINE_RECORDS)]
      if "described_vqa" in synthetic:  # Each question after its scene's caption: does the model read the context?
        self._eval_data["described_vqa"] = shapes_vqa.eval_set(n=e.described_vqa.n, described_fraction=1.0, **kw)
      if "captioning" in synthetic:
        self._eval_data["captioning"] = shapes_vqa.eval_set(n=e.captioning.n, caption_fraction=1.0, **kw)
      if "few_shot" in synthetic:
        self._eval_data["few_shot"] = {k: self._few_shot_set(e.few_shot, k, kw) for k in e.few_shot.shots}
      if d.get("rag") and d.rag.get("k", 0):
        self._with_retrieved_captions()
    return self._eval_data

  def _with_retrieved_captions(self):
    """The VQA, captioning and few-shot records with the captions `data.rag` retrieves for them, as
    in training (`described_vqa` asks after the scene's own description instead)."""
    retrieve, k = rag.retriever(self.config.data), self.config.data.rag.k
    for name in ("vqa", "captioning"):
      if name in self._eval_data:
        self._eval_data[name] = rag.augment(self._eval_data[name], retrieve, k)
    for shots, episodes in self._eval_data.get("few_shot", {}).items():
      flat = iter(rag.augment([r for ep in episodes for r in ep], retrieve, k))
      self._eval_data["few_shot"][shots] = [[next(flat) for _ in ep] for ep in episodes]

  @staticmethod
  def _few_shot_set(few_shot, shots: int, kw: dict) -> list[list[dict]]:
    """Episodes with random demonstrations, or (`few_shot.selection="rices"`) those whose images are
    nearest the query's by the two-tower export `few_shot.retriever`, from `few_shot.pool` records."""
    selection = few_shot.get("selection", "random")
    if selection == "random" or shots == 0:
      return shapes_vqa.few_shot_set(n=few_shot.n, shots=shots, **kw)
    if selection != "rices":
      raise ConfigError(f"evals.few_shot.selection={selection!r}: expected 'random' or 'rices'")
    if not few_shot.get("retriever"):
      raise ConfigError("evals.few_shot.selection='rices' needs evals.few_shot.retriever, a two-tower export")
    return shapes_vqa.retrieved_few_shot_set(image_similarity_selector(few_shot.retriever), n=few_shot.n,
                                             shots=shots, pool=few_shot.get("pool", 1024), **kw)

  def answer(self, params, episodes: list[dict], max_new_tokens: int, max_len: int | None = None) -> list[str]:
    """`answer` with evals.batch_size, prompts padded to `max_len` tokens (default: data.max_len)."""
    chunk = self.config.evals.batch_size
    if chunk % parallel.batch_size_divisor(self.mesh):
      raise ConfigError(f"evals.batch_size={chunk} must be divisible by the "
                        f"{parallel.batch_size_divisor(self.mesh)} batch-sharded devices")
    sequence = dataclasses.replace(self.sequence, max_len=max_len or self.max_len)
    with jax.set_mesh(self.mesh):
      return answer(self.model, params, sequence, episodes, max_new_tokens=max_new_tokens, batch_size=chunk)

  def evaluate(self, params) -> dict[str, float]:
    """`{"vqa/accuracy": ..., "vqa/majority_baseline": ..., "captioning/cider": ..., "few_shot/4": ...}`: the
    shapes evals, and the benchmark entries on files (`evals.<name>.benchmark`: vqav2, coco_captions,
    multiple_choice; `mmjax.evals.vlm_benchmarks.run`)."""
    sets, e, results = self._eval_sets(), self.config.evals, {}
    for name in ("vqa", "described_vqa"):
      if name not in sets:
        continue
      records = sets[name]
      predictions = self.answer(params, [shapes_vqa.episode([r]) for r in records], e[name].max_new_tokens)
      references = [r["answer"] for r in records]
      results[f"{name}/accuracy"] = vqa.exact_match(predictions, references)
      if name == "vqa":
        results["vqa/majority_baseline"] = vqa.majority_baseline(sets["vqa_train_answers"], references)[1]
      for kind, acc in vqa.per_type(predictions, references, [r["kind"] for r in records]).items():
        results[f"{name}/{kind}"] = acc
    if "captioning" in sets:
      records = sets["captioning"]
      predictions = self.answer(params, [shapes_vqa.episode([r]) for r in records], e.captioning.max_new_tokens)
      references = [[r["answer"]] for r in records]
      results["captioning/bleu4"] = captioning.bleu(predictions, references)
      results["captioning/cider"] = captioning.cider(predictions, references)
    for shots, episodes in sets.get("few_shot", {}).items():
      predictions = self.answer(params, [shapes_vqa.episode(ep) for ep in episodes], e.few_shot.max_new_tokens,
                                e.few_shot.max_len)
      results[f"few_shot/{shots}"] = vqa.exact_match(predictions, [ep[-1]["answer"] for ep in episodes])
    for name, benchmark, data, options in benchmark_entries(e):
      loaded = bundle.LoadedModel(self.model, params, self.tokenizer, self.model_config)
      with jax.set_mesh(self.mesh):
        result = vlm_benchmarks.run(loaded, benchmark, data, batch_size=e.batch_size,
                                    image_size=self.config.data.image_size, **options)
      results.update({f"{name}/{k}": v for k, v in result.metrics.items()})
    return results
