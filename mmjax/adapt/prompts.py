"""Prompt learners for two-tower models: CoOp, CoCoOp, MaPLe and CoPrompt.

The frozen two-tower model runs unchanged; learned vectors enter it by intercepting module
calls (`nn.intercept_methods`), with widths read from the model's own config:

- Text: a class prompt is `M` context slots followed by the class name's tokens and EOS.
  The token embeddings of the slots (the output of `txt/Embed_0`) are replaced by the context
  vectors; deep methods also replace the slots' hidden states at the input of text blocks 1..J-1.
- Image (MaPLe, CoPrompt): `P` prompt tokens are appended to the ViT's tokens at the encoder
  input (`img/Transformer`), replaced at the input of blocks 1..J-1 and dropped from the
  encoder's output, so pooling sees the usual tokens.

Methods (`config.prompt.method`):
  template  the fixed prompt `init_words` + class name, nothing learned: the zero-shot classifier
            with that template, for adapting the model's weights instead (LoRA, `config.adapt`).
  coop      M context vectors shared by all classes (or one set per class, `class_specific`).
  cocoop    CoOp plus a Meta-Net (Linear-ReLU-Linear, bottleneck width/16) mapping each image's
            embedding to a token added to every context vector: prompts are image-conditioned.
  maple     text context at depth J, and vision prompts made from the text prompts of each layer
            by a learned linear coupling (vision-language prompts, Khattak et al. 2023).
  coprompt  MaPLe's prompts, plus residual adapters on both embeddings (up-projection zero-
            initialised) and a consistency loss pulling the prompted embeddings towards the
            frozen model's (Roy & Etemad 2024; the frozen text side uses the template ensemble
            where the paper uses LLM-written descriptions).

With `init_words` (e.g. "a photo of a", M = its token count) the context starts at those
words' token embeddings, held as embedding + learned offset (zero at init), so CoOp starts
exactly at the zero-shot classifier with that template.
"""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError

METHODS = ("template", "coop", "cocoop", "maple", "coprompt")
TEXT_EMBED = "txt/Embed_0"
TEXT_BLOCK = re.compile(r"^txt/Encoder_0/encoderblock_(\d+)$")
IMAGE_ENCODER = "img/Transformer"
IMAGE_BLOCK = re.compile(r"^img/Transformer/encoderblock_(\d+)$")


def prompt_tokens(tokenizer, class_names, num_context: int, max_len: int) -> np.ndarray:
  """int32 [C, max_len]: `num_context` slots (id 0, replaced) then each class name and EOS."""
  rows = tokenizer.encode(list(class_names), max_len - num_context)
  if (rows[:, -1] != tokenizer.pad_id).any():
    long = [n for n, r in zip(class_names, rows) if r[-1] != tokenizer.pad_id]
    raise ConfigError(f"class names {long[:3]} do not fit model.text.max_len={max_len} after "
                      f"{num_context} context slots; lower prompt.num_context")
  return np.concatenate([np.zeros((len(rows), num_context), np.int32), rows], axis=1)


def _dense_init(key, fan_in: int, fan_out: int, zero: bool = False) -> dict:
  w = jnp.zeros((fan_in, fan_out)) if zero else jax.random.normal(key, (fan_in, fan_out)) * fan_in ** -0.5
  return {"w": w, "b": jnp.zeros((fan_out,))}


def _dense(p: dict, x):
  return x @ p["w"] + p["b"]


class PromptLearner:
  """The method's parameters and how they enter the frozen model (see the module docstring).

  `model_config` is the resolved two-tower config (`model.text.width`, `model.image.width`,
  `model.embed_dim`, depths); `prompt_config` is `config.prompt`. `base_params` below are the
  parameters the model's `apply` takes (with LoRA, `{"base", "adapter"}`).
  """

  def __init__(self, model_config: dict, prompt_config: dict, tokenizer):
    cfg = dict(prompt_config)
    self.method = cfg["method"]
    if self.method not in METHODS:
      raise ConfigError(f"prompt.method={self.method!r}; known: {list(METHODS)}")
    self.num_context = int(cfg.get("num_context", 16))
    self.depth = int(cfg.get("depth", 1))
    if self.depth != 1 and self.method not in ("maple", "coprompt"):
      raise ConfigError(f"prompt.depth={self.depth}: deep prompts are MaPLe's and CoPrompt's; "
                        f"prompt.method={self.method!r} takes depth 1")
    self.num_image_prompts = self.num_context
    self.class_specific = bool(cfg.get("class_specific", False))
    if self.class_specific and self.method != "coop":
      raise ConfigError("prompt.class_specific applies to method 'coop' only")
    self.text_width = model_config["text"]["width"]
    self.image_width = model_config["image"]["width"]
    self.embed_dim = model_config["embed_dim"]
    for side in ("text", "image"):
      if self.depth > 1 and model_config[side].get("scan"):
        raise ConfigError(f"prompt.depth={self.depth} replaces prompts between blocks: set model.{side}.scan=False")
      if self.depth > model_config[side]["depth"]:
        raise ConfigError(f"prompt.depth={self.depth} exceeds model.{side}.depth={model_config[side]['depth']}")
    words = cfg.get("init_words") or ""
    self.init_ids = None
    if words:
      ids = list(tokenizer.ids(words))
      if len(ids) != self.num_context:
        raise ConfigError(f"prompt.init_words={words!r} is {len(ids)} tokens; set prompt.num_context={len(ids)}")
      self.init_ids = np.asarray(ids, np.int32)
    elif self.method == "template":
      raise ConfigError("prompt.method='template' needs prompt.init_words (e.g. 'a photo of a')")
    self.consistency = float(cfg.get("consistency", 0.0))

  def init(self, rng, num_classes: int) -> dict:
    if self.method == "template":
      return {}
    keys = iter(jax.random.split(rng, 8))
    m, wt = self.num_context, self.text_width
    shape = (num_classes, m, wt) if self.class_specific else (m, wt)
    if self.init_ids is None:
      ctx = jax.random.normal(next(keys), shape) * 0.02
    else:
      ctx = jnp.zeros(shape)  # An offset from the init words' embeddings.
    params: dict[str, Any] = {"ctx": ctx}
    if self.depth > 1:
      params["deep_ctx"] = jax.random.normal(next(keys), (self.depth - 1, m, wt)) * 0.02
    if self.method == "cocoop":
      hidden = max(self.embed_dim // 16, 1)
      params["meta_net"] = {"linear1": _dense_init(next(keys), self.embed_dim, hidden),
                            "linear2": _dense_init(next(keys), hidden, wt)}
    if self.method in ("maple", "coprompt"):
      params["coupling"] = {"w": jax.random.normal(next(keys), (self.depth, wt, self.image_width)) * wt ** -0.5,
                            "b": jnp.zeros((self.depth, self.image_width))}
    if self.method == "coprompt":
      hidden = max(self.embed_dim // 4, 1)
      params["adapters"] = {side: {"down": _dense_init(next(keys), self.embed_dim, hidden),
                                   "up": _dense_init(None, hidden, self.embed_dim, zero=True)}
                            for side in ("img", "txt")}
    return params

  def context(self, params: dict, base_params: dict, conditioning=None) -> jax.Array:
    """Layer-0 context vectors: [M, W], [C, M, W] (class-specific) or [N, M, W] (CoCoOp, one
    row per image embedding in `conditioning` [N, D])."""
    ctx = params.get("ctx", 0.0)
    if self.init_ids is not None:
      two_tower = base_params["base"] if "adapter" in base_params else base_params  # LoRA: {base, adapter}.
      table = jax.lax.stop_gradient(two_tower["txt"]["Embed_0"]["embedding"])
      ctx = ctx + table[self.init_ids].astype(jnp.float32)
    if self.method == "cocoop":
      meta = params["meta_net"]
      bias = _dense(meta["linear2"], jax.nn.relu(_dense(meta["linear1"], conditioning)))
      ctx = ctx[None] + bias[:, None, :]
    return ctx

  def vision_prompts(self, params: dict, base_params: dict) -> jax.Array:
    """[J, P, W_img]: each layer's text prompts through that layer's coupling."""
    text = [self.context(params, base_params)] + ([params["deep_ctx"][i] for i in range(self.depth - 1)])
    c = params["coupling"]
    return jnp.stack([t @ c["w"][i] + c["b"][i] for i, t in enumerate(text)])

  def adapt_embedding(self, params: dict, z, side: str):
    """CoPrompt's residual adapter on an embedding, re-normalised; other methods pass z through."""
    if self.method != "coprompt":
      return z
    a = params["adapters"][side]
    z = z + _dense(a["up"], jax.nn.relu(_dense(a["down"], z)))
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  def interceptor(self, text_ctx, deep_text=None, image_prompts=None):
    """An `nn.intercept_methods` interceptor placing the prompts (see the module docstring).

    `text_ctx`: the context for the text rows (None: the text side is not prompted);
    `deep_text` [J-1, M, W]; `image_prompts` [J, P, W_img] (None: the image side is not)."""
    m, calls = self.num_context, {"text": 0, "image": 0}

    def place(x, prompts, where):
      prompts = jnp.broadcast_to(prompts.astype(x.dtype), x.shape[:1] + prompts.shape[-2:])
      return x.at[:, where].set(prompts)

    def intercept(next_fun, args, kwargs, context):
      if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      path = "/".join(context.module.path)
      if text_ctx is not None:
        if path == TEXT_EMBED:
          return place(next_fun(*args, **kwargs), text_ctx, slice(0, m))
        block = TEXT_BLOCK.match(path)
        if deep_text is not None and block and 0 < int(block.group(1)) < self.depth:
          calls["text"] += 1
          args = (place(args[0], deep_text[int(block.group(1)) - 1], slice(0, m)),) + args[1:]
      if image_prompts is not None:
        p = image_prompts.shape[1]
        if path == IMAGE_ENCODER:
          x = args[0]
          prompts = jnp.broadcast_to(image_prompts[0].astype(x.dtype), (x.shape[0],) + image_prompts.shape[1:])
          out, aux = next_fun(jnp.concatenate([x, prompts], axis=1), *args[1:], **kwargs)
          keep = args[2] if len(args) > 2 else kwargs.get("keep")
          # With `keep` (a tower pooled at its class token) only that token comes back.
          return (out if keep is not None else out[:, :-p]), aux
        block = IMAGE_BLOCK.match(path)
        if block and 0 < int(block.group(1)) < self.depth:
          calls["image"] += 1
          args = (place(args[0], image_prompts[int(block.group(1))], slice(-p, None)),) + args[1:]
      return next_fun(*args, **kwargs)

    intercept.calls = calls
    return intercept

  def _run(self, model, base_params: dict, intercept, expected: int, **inputs):
    with nn.intercept_methods(intercept):
      zimg, ztxt, aux = model.apply({"params": base_params}, **inputs)
    if sum(intercept.calls.values()) != expected:
      raise ConfigError(f"prompt.depth={self.depth}: expected {expected} block inputs replaced, replaced "
                        f"{intercept.calls}; the model's blocks are not named like "
                        f"{TEXT_BLOCK.pattern} and {IMAGE_BLOCK.pattern}")
    return zimg, ztxt, aux

  def encode_images(self, model, params: dict, base_params: dict, images):
    """`(zimg [B, D], aux)` of the frozen `model`, with vision prompts for MaPLe and CoPrompt."""
    if self.method in ("maple", "coprompt"):
      intercept = self.interceptor(None, image_prompts=self.vision_prompts(params, base_params))
      zimg, _, aux = self._run(model, base_params, intercept, self.depth - 1, image=images)
    else:
      zimg, _, aux = model.apply({"params": base_params}, image=images)
    return self.adapt_embedding(params, zimg, "img"), aux

  def encode_texts(self, model, params: dict, base_params: dict, tokens, conditioning=None):
    """`ztxt [N, D]` of the prompted class rows `tokens` [N, L] (from `prompt_tokens`); CoCoOp's
    `conditioning` [N, D] holds the image embedding each row is conditioned on."""
    intercept = self.interceptor(self.context(params, base_params, conditioning), params.get("deep_ctx"))
    _, ztxt, _ = self._run(model, base_params, intercept, self.depth - 1, text=tokens)
    return self.adapt_embedding(params, ztxt, "txt")
