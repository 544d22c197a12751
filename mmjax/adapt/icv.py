"""In-context vectors: what k demonstrations do to a generative model, as one shift per decoder block.

Both kinds are `adapt.method="shift"` parameters (a vector added to each block's output at every
position; `shifted(model)` wraps a model to apply them, `{"base": params, "adapter": vectors}`):

- `extract`, the heuristic in-context vector (Hendel et al. 2023; Liu et al. 2024): with Δ_l the
  mean over episodes of block l's output at the last prompt token with the demonstrations minus
  without them, block l gets scale·(Δ_l − Δ_{l−1}), its own share of the difference (the residual
  stream carries the earlier blocks' shares forward).
- `train_live`, LIVE (Peng et al. 2024): the vectors trained with the model frozen, so that the
  model without demonstrations imitates its next-token distribution with them (KL divergence)
  while predicting the answer's first token (cross-entropy).

Either answers from the zero-shot prompt; `prompt_tokens` counts what each way processes.
Episodes are `mmjax.data.shapes_vqa.episode` dicts: demonstrations first, the query last.
"""
from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.adapt.wrap import ADAPTER, BASE, wrap
from mmjax.errors import ConfigError

BLOCKS = r"(^|/)layers_\d+$"  # Decoder blocks, of an LM ("layers_3") or inside a VLM ("lm/layers_3").


def shift_config(pattern: str = BLOCKS) -> dict:
  return {"method": "shift", "targets": ((pattern, 1),)}


def shifted(model, pattern: str = BLOCKS):
  """`model` with a shift after every module matching `pattern`; parameters {"base", "adapter"}."""
  return wrap(model, shift_config(pattern))


def zero_shot(episode: dict) -> dict:
  """The episode's query alone."""
  return {k: v[-1:] for k, v in episode.items()}


def fitted(sequence, episodes: list[dict]):
  """`sequence` with `max_len` the longest prompt of `episodes`: no padding beyond what they need."""
  longest = max(len(sequence.ids(ep["prompts"], ep["answers"][:-1])[0]) for ep in episodes)
  return dataclasses.replace(sequence, max_len=longest)


def prompts(sequence, episodes: list[dict]):
  """`(tokens, mask, images or None)` of the generation prompts, stacked."""
  built = [sequence.prompt(ep) for ep in episodes]
  tokens, mask = np.stack([b[0] for b in built]), np.stack([b[1] for b in built])
  images = None
  if sequence.image_token_id is not None:
    images = np.stack([ep["image"] for ep in episodes]).astype(np.float32) / 127.5 - 1.0
  return tokens, mask, images


def prompt_tokens(sequence, episodes: list[dict]) -> float:
  """Mean real tokens per prompt (image placeholders included)."""
  return float(np.mean([np.sum(sequence.prompt(ep)[1]) for ep in episodes]))


def _forward(model, variables, tokens, mask, images):
  if images is None:
    return model.apply(variables, tokens, mask=mask)[0]
  return model.apply(variables, images, tokens, mask=mask)[0]


def _last_states(model, pattern: str):
  """jitted `(params, tokens, mask, images) -> {module path: [batch, width]}` outputs at the last position."""
  match = re.compile(pattern)

  def fn(params, tokens, mask, images):
    states = {}

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      path = "/".join(context.module.path)
      if context.method_name == "__call__" and match.search(path):
        states[path] = (out[0] if isinstance(out, tuple) else out)[:, -1].astype(jnp.float32)
      return out

    with nn.intercept_methods(record):
      _forward(model, {"params": params}, tokens, mask, images)
    return states

  return jax.jit(fn)


def _mean_states(model, params, sequence, episodes, pattern, batch_size):
  fn, sums = _last_states(model, pattern), {}
  for start in range(0, len(episodes), batch_size):
    states = fn(params, *prompts(sequence, episodes[start:start + batch_size]))
    for path, value in states.items():
      sums[path] = sums.get(path, 0.0) + np.asarray(value, np.float64).sum(axis=0)
  if not sums:
    raise ConfigError(f"in-context vectors: no module path matches {pattern!r}")
  return {path: total / len(episodes) for path, total in sums.items()}


def _block_order(path: str) -> tuple:
  return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path))


def _nest(vectors: dict) -> dict:
  tree: dict = {}
  for path, v in vectors.items():
    node = tree
    for key in path.split("/"):
      node = node.setdefault(key, {})
    node["vector"] = jnp.asarray(v, jnp.float32)
  return tree


def extract(model, params, sequence, episodes: list[dict], *, scale: float = 1.0, pattern: str = BLOCKS,
            batch_size: int = 32) -> dict:
  """The heuristic in-context vectors (adapter parameters of `shifted(model)`) of `episodes`."""
  alone = [zero_shot(ep) for ep in episodes]
  with_demos = _mean_states(model, params, fitted(sequence, episodes), episodes, pattern, batch_size)
  without = _mean_states(model, params, fitted(sequence, alone), alone, pattern, batch_size)
  vectors, previous = {}, 0.0
  for path in sorted(with_demos, key=_block_order):
    delta = with_demos[path] - without[path]
    vectors[path] = scale * (delta - previous)
    previous = delta
  return _nest(vectors)


def train_live(model, params, sequence, episodes: list[dict], *, steps: int = 200, lr: float = 1e-2,
               batch_size: int = 16, seed: int = 0, pattern: str = BLOCKS, init: dict | None = None):
  """`(vectors, losses)`: LIVE's per-block vectors trained on `episodes` (model frozen), starting from
  `init` (e.g. `extract`'s) or zero; `losses` is the objective at every step."""
  if any(len(ep["prompts"]) < 2 for ep in episodes):
    raise ConfigError("train_live needs episodes with demonstrations before the query")
  gold = np.array([sequence.tokenizer.ids(ep["answers"][-1])[0] for ep in episodes], np.int32)
  base_logits = jax.jit(lambda p, t, m, i: _forward(model, {"params": p}, t, m, i)[:, -1])
  long = fitted(sequence, episodes)
  teacher = np.concatenate([np.asarray(jax.nn.log_softmax(base_logits(params, *prompts(long, episodes[s:s + 32]))))
                            for s in range(0, len(episodes), 32)])
  alone = [zero_shot(ep) for ep in episodes]
  student_inputs = prompts(fitted(sequence, alone), alone)
  student = shifted(model, pattern)
  vectors = init if init is not None else nn.unbox(student.init(
      jax.random.key(0), *((student_inputs[2][:1],) if student_inputs[2] is not None else ()),
      student_inputs[0][:1], mask=student_inputs[1][:1])["params"][ADAPTER])
  tx = optax.adam(lr)

  def loss_fn(vectors, tokens, mask, images, teacher_logp, gold):
    logits = _forward(student, {"params": {BASE: params, ADAPTER: vectors}}, tokens, mask, images)[:, -1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    kl = jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - logp), axis=-1)
    ce = -jnp.take_along_axis(logp, gold[:, None], axis=-1)[:, 0]
    return jnp.mean(kl + ce)

  @jax.jit
  def step(vectors, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(vectors, *batch)
    updates, state = tx.update(grads, state, vectors)
    return optax.apply_updates(vectors, updates), state, loss

  state, rng, losses = tx.init(vectors), np.random.default_rng(seed), []
  for _ in range(steps):
    rows = rng.choice(len(episodes), size=min(batch_size, len(episodes)), replace=False)
    images = None if student_inputs[2] is None else student_inputs[2][rows]
    batch = (student_inputs[0][rows], student_inputs[1][rows], images, teacher[rows], gold[rows])
    vectors, state, loss = step(vectors, state, batch)
    losses.append(float(loss))
  return vectors, losses
