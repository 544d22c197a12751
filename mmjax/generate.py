"""Batched generation with a `mmjax.models.decoder.Decoder`: greedy decoding and beam search; and
for episodes (images, prompts, answers; `mmjax.data.sequences`), greedy answers (`answer`) and the
log-likelihood of given answers (`answer_log_likelihoods`).

Prompts are LEFT-padded: each row's real tokens end in the last column and a boolean mask (or
the row lengths) marks them. Then every row writes each new token to the same cache slot,
and positions count real tokens only, so a padded row decodes exactly like the unpadded one.
The prompt fills the KV cache in one call; decoding runs one token per step inside a jitted
`jax.lax.while_loop`, which stops when every row is done.

Beam search follows HF transformers' (`early_stopping=False`): each step keeps the best
`max(2, 1 + len(stop_tokens)) * num_beams` continuations; those ending in a stop token (and,
at the last step, all of them) among the first `num_beams` become finished hypotheses scored
`sum of log-probs / generated_length ** length_penalty`; the best `num_beams` others run on.
A row stops adding hypotheses once its best running beam, scored at the current length,
cannot beat its worst finished one.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data import sequences
from mmjax.errors import ConfigError
from mmjax.evals import map_padded_chunks
from mmjax.models.decoder import Decoder

METHODS = ("greedy", "beam")
_NEG = -1.0e9  # HF's "impossible" score; added (not assigned) so orderings match HF's.


def generate(model, params, prompt_tokens, prompt_mask_or_lengths, *, max_new_tokens: int, stop_tokens=(),
             method: str = "greedy", num_beams: int = 4, length_penalty: float = 1.0, pad_id: int = 0,
             inputs_embeds=None, images=None):
  """`(tokens [batch, max_new_tokens] int32, scores [batch] float32)` continuing left-padded prompts.

  `prompt_tokens` [batch, prompt_len] (None when `inputs_embeds` [batch, prompt_len, width] are
  given, e.g. with image features spliced in); `prompt_mask_or_lengths`: a bool mask [batch,
  prompt_len] (True = real token, padding on the left) or the lengths [batch]. A row stops at
  its first token in `stop_tokens` (kept) and is `pad_id` after it. Scores: greedy, the summed
  log-probabilities of the kept tokens; beam, the best hypothesis' length-penalised score.
  `method="beam"` with `num_beams=1` is greedy decoding, as in HF.

  `images` [batch, M, H, W, 3] makes `model` a vision-language model (`mmjax.models.vlm`
  interface): the prompt is read with the images, `model.apply(v, images, tokens, mask=,
  cache=)`, and each decoding step without them, `model.apply(v, None, token, cache=)`.
  """
  if method not in METHODS:
    raise ConfigError(f"generate method={method!r}; known: {list(METHODS)}")
  if max_new_tokens < 1 or (method == "beam" and num_beams < 1):
    raise ConfigError(f"generate needs max_new_tokens >= 1 and num_beams >= 1, got {max_new_tokens}, {num_beams}")
  if inputs_embeds is None and prompt_tokens is None:
    raise ConfigError("generate needs prompt_tokens or inputs_embeds")
  prompt_len = (inputs_embeds if prompt_tokens is None else prompt_tokens).shape[1]
  mask = _prompt_mask(prompt_mask_or_lengths, prompt_len)
  tokens = None if prompt_tokens is None else jnp.asarray(prompt_tokens, jnp.int32)
  stop = jnp.asarray(tuple(stop_tokens), jnp.int32).reshape(-1)
  if images is not None and inputs_embeds is not None:
    raise ConfigError("generate takes images or inputs_embeds, not both")
  return _generate(model, params, tokens, mask, inputs_embeds, images, stop, jnp.float32(length_penalty),
                   max_new_tokens=int(max_new_tokens), num_beams=int(num_beams) if method == "beam" else 1,
                   pad_id=int(pad_id))


def _prompt_mask(mask_or_lengths, prompt_len: int):
  x = jnp.asarray(mask_or_lengths)
  if x.ndim == 1:
    return jnp.arange(prompt_len)[None, :] >= prompt_len - x[:, None]
  mask = x.astype(bool)
  if not isinstance(mask, jax.core.Tracer):
    m = np.asarray(mask)
    bad = np.nonzero((m[:, 1:] < m[:, :-1]).any(axis=1))[0]
    if bad.size:
      raise ConfigError(f"prompt mask rows {bad.tolist()} are not left-padded (padding must come first)")
  return mask


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "num_beams", "pad_id"))
def _generate(model, params, tokens, mask, inputs_embeds, images, stop, length_penalty, *, max_new_tokens, num_beams,
              pad_id):
  """The jitted loop (greedy when `num_beams == 1`); `stop` [num_stop_tokens] is traced, so only its
  length shapes the compilation."""
  batch, prompt_len = mask.shape

  variables = {"params": params}
  vlm = images is not None

  def step(token, cache):
    logits, aux = (model.apply(variables, None, token[:, None], cache=cache) if vlm else
                   model.apply(variables, token[:, None], cache=cache))
    return logits[:, -1], aux["cache"]

  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  if vlm:
    logits, aux = model.apply(variables, images, tokens, mask=mask, cache=cache)
  else:
    logits, aux = model.apply(variables, tokens, mask=mask, cache=cache, inputs_embeds=inputs_embeds)
  logits, cache = logits[:, -1], aux["cache"]
  if num_beams > 1:
    cache = jax.tree.map(lambda a: jnp.repeat(a, num_beams, axis=0) if a.ndim else a, cache)
    logits = jnp.repeat(logits, num_beams, axis=0)
    return _beam_search(step, logits, cache, batch, num_beams, max_new_tokens, stop, length_penalty, pad_id)
  return _greedy(step, logits, cache, max_new_tokens, stop, pad_id)


def _greedy(step, logits, cache, n, stop, pad_id):
  batch = logits.shape[0]

  def body(state):
    t, cache, logits, out, done, score = state
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=1)[:, 0]
    score = score + jnp.where(done, 0.0, logp)
    token = jnp.where(done, pad_id, token)
    out = out.at[:, t].set(token)
    done = done | jnp.isin(token, stop)
    logits, cache = step(token, cache)
    return t + 1, cache, logits, out, done, score

  state = (0, cache, logits, jnp.full((batch, n), pad_id, jnp.int32), jnp.zeros((batch,), bool),
           jnp.zeros((batch,), jnp.float32))
  state = jax.lax.while_loop(lambda s: (s[0] < n) & ~jnp.all(s[4]), body, state)
  return state[3], state[5]


def _take(x, idx):
  """x [batch, k, ...] gathered along axis 1 at idx [batch, j]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_search(step, logits, cache, batch, beams, n, stop, length_penalty, pad_id):
  """HF's beam search (see the module docstring) on a cache of `batch * beams` rows, beam-major per row.

  State: running beams (`seqs`, `scores`), the best finished hypotheses (`done_seqs`,
  `done_scores`, `done` flags) and whether each row can still improve on them.
  """
  vocab = logits.shape[-1]
  keep = max(2, 1 + stop.shape[0]) * beams
  in_top = jnp.arange(keep) < beams

  def body(state):
    t, cache, logits, seqs, scores, done_seqs, done_scores, done, improvable = state
    logp = jax.nn.log_softmax(logits).reshape(batch, beams, vocab) + scores[:, :, None]
    cand_scores, flat = jax.lax.top_k(logp.reshape(batch, beams * vocab), keep)
    src, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    cand = _take(seqs, src).at[:, :, t].set(token)
    ends = jnp.isin(token, stop) | (t == n - 1)
    # Running beams: the best `beams` candidates that did not just end.
    run_scores, pick = jax.lax.top_k(cand_scores + ends * _NEG, beams)
    seqs, src = _take(cand, pick), _take(src, pick)
    # Finished hypotheses: merge those that just ended (among the first `beams`) with the kept ones.
    new = cand_scores / (t + 1.0) ** length_penalty + (~improvable)[:, None] * _NEG + ~(ends & in_top) * _NEG
    done_scores, pick = jax.lax.top_k(jnp.concatenate([done_scores, new], axis=1), beams)
    done_seqs = _take(jnp.concatenate([done_seqs, cand], axis=1), pick)
    done = _take(jnp.concatenate([done, ends & in_top], axis=1), pick)
    best_running = run_scores[:, 0] / (t + 1.0) ** length_penalty
    worst = jnp.where(done, jnp.min(done_scores, axis=1, keepdims=True), _NEG)
    improvable = improvable & jnp.any(best_running[:, None] > worst, axis=1)
    rows = (jnp.arange(batch)[:, None] * beams + src).reshape(-1)
    cache = jax.tree.map(lambda a: a[rows] if a.ndim else a, cache)
    logits, cache = step(seqs[:, :, t].reshape(-1), cache)
    return t + 1, cache, logits, seqs, run_scores, done_seqs, done_scores, done, improvable

  seqs = jnp.full((batch, beams, n), pad_id, jnp.int32)
  scores = jnp.tile(jnp.where(jnp.arange(beams) == 0, 0.0, _NEG), (batch, 1)).astype(jnp.float32)
  state = (0, cache, logits, seqs, scores, seqs, jnp.full((batch, beams), _NEG, jnp.float32),
           jnp.zeros((batch, beams), bool), jnp.ones((batch,), bool))
  state = jax.lax.while_loop(lambda s: (s[0] < n) & jnp.any(s[8]), body, state)
  return state[5][:, 0], state[6][:, 0]


def make_sequence(model, tokenizer, max_len: int, loss_on: str | None = None) -> sequences.BuildSequence:
  """How `model` reads episodes: image tokens per image, and the token ending each answer
  (Flamingo's `<|endofchunk|>`, as in its interleaved documents; EOS otherwise)."""
  if isinstance(model, Decoder):
    return sequences.BuildSequence(tokenizer, max_len, None, 0, tokenizer.eos_id, loss_on or "all")
  terminator = getattr(model, "end_of_chunk_id", None)
  return sequences.BuildSequence(tokenizer, max_len, model.image_token_id, model.num_image_tokens,
                                 tokenizer.eos_id if terminator is None else terminator, loss_on or "answer")


def answer(model, params, sequence: sequences.BuildSequence, episodes: list[dict], *, max_new_tokens: int,
           batch_size: int = 64) -> list[str]:
  """Greedy answers to the last prompt of each episode (dict(image uint8 [M, S, S, 3], prompts,
  answers); the answers before the last are solved demonstrations), `batch_size` at a time."""
  tokenizer = sequence.tokenizer
  stop = sorted({tokenizer.eos_id, sequence.terminator})

  def generated_ids(chunk: list[dict]) -> np.ndarray:
    prompts = [sequence.prompt(ep) for ep in chunk]
    tokens, mask = np.stack([p[0] for p in prompts]), np.stack([p[1] for p in prompts])
    images = None
    if sequence.image_token_id is not None:
      images = jnp.asarray(np.stack([ep["image"] for ep in chunk]).astype(np.float32) / 127.5 - 1.0)
    ids, _ = generate(model, params, jnp.asarray(tokens), jnp.asarray(mask), max_new_tokens=max_new_tokens,
                      stop_tokens=stop, pad_id=tokenizer.pad_id, images=images)
    return np.asarray(jax.device_get(ids))

  return [tokenizer.decode([i for i in row if i not in stop and i != tokenizer.pad_id]).strip()
          for ids in map_padded_chunks(generated_ids, (episodes,), batch_size) for row in ids.tolist()]


@functools.partial(jax.jit, static_argnums=0)
def _weighted_log_likelihood(model, params, images, tokens, mask, targets, weights):
  args = (tokens,) if images is None else (images, tokens)
  logits, _ = model.apply({"params": params}, *args, mask=mask)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * weights, axis=-1)


def answer_log_likelihoods(model, params, sequence: sequences.BuildSequence, episodes: list[dict], *,
                           batch_size: int = 64) -> np.ndarray:
  """float32 [N]: for each episode (dict(image uint8 [M, S, S, 3], prompts, answers)), the summed
  log-probability of the tokens `sequence` weights (with `loss_on="answer"`, each answer's tokens and
  its terminator), each given everything before it: one forward pass per sequence, `batch_size` at a time."""
  def scores(chunk: list[dict]) -> np.ndarray:
    rows = [sequence.map(dict(ep, image=np.asarray(ep["image"], np.float32) / 127.5 - 1.0)
                         if sequence.image_token_id is not None else ep) for ep in chunk]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    return np.asarray(jax.device_get(_weighted_log_likelihood(
        model, params, batch.get("image"), batch["tokens"], batch["mask"], batch["targets"], batch["weights"])))

  return np.concatenate(map_padded_chunks(scores, (episodes,), batch_size))
