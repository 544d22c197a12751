"""In-context vectors: the shift against a hand-run block loop, extraction against hand-collected states, LIVE."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.adapt import icv
from mmjax.adapt.wrap import ADAPTER, BASE
from mmjax.config import decoder
from mmjax.data import shapes_vqa
from mmjax.data.tokenizer import load_tokenizer
from mmjax.models.decoder import build_decoder
from mmjax.generate import make_sequence
from tests.helpers import random_params


@pytest.fixture(scope="module")
def lm():
  tokenizer = load_tokenizer("shapes_vlm")
  model = build_decoder(decoder("shapes", vocab_size=tokenizer.vocab_size, width=32, depth=2, num_heads=2, mlp_dim=64))
  # Larger than the init (std 0.02), so the logits have a range a shift can move.
  params = random_params(model, jnp.zeros((1, 8), jnp.int32))
  return model, params, make_sequence(model, tokenizer, 160, loss_on="answer")


def _episodes(n, shots, train=False):
  return [shapes_vqa.episode(ep) for ep in shapes_vqa.few_shot_set(image_size=16, n=n, shots=shots,
                                                                  train_queries=bool(train))]


def _block_loop(model, params, tokens, mask, shifts=None):
  """Logits and each block's last-position output, running the decoder's blocks by hand; shifts[i] is
  added after block i."""
  def run(module, tokens, mask):
    x, block_kw, state = module.prepare(tokens, mask=mask)
    last = []
    for i, block in enumerate(module.layers):
      x, _ = block(x, **block_kw)
      if shifts is not None:
        x = x + shifts[i]
      last.append(x[:, -1])
    return module.finish(x, block_kw, state, None)[0], last

  return nn.apply(run, model)({"params": params}, tokens, mask)


def test_shift_adds_each_vector_after_its_block(lm):
  model, params, sequence = lm
  tokens, mask, _ = icv.prompts(icv.fitted(sequence, _episodes(3, 0)), _episodes(3, 0))
  rng = np.random.default_rng(0)
  shifts = [jnp.asarray(rng.normal(size=32), jnp.float32) for _ in range(2)]
  vectors = {f"layers_{i}": {"vector": v} for i, v in enumerate(shifts)}
  got = icv.shifted(model).apply({"params": {BASE: params, ADAPTER: vectors}}, tokens, mask=mask)[0]
  want, _ = _block_loop(model, params, tokens, mask, shifts)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  zero = {k: {"vector": jnp.zeros(32)} for k in vectors}  # Zero vectors: the base model exactly.
  np.testing.assert_array_equal(icv.shifted(model).apply({"params": {BASE: params, ADAPTER: zero}}, tokens,
                                                         mask=mask)[0], model.apply({"params": params}, tokens,
                                                                                    mask=mask)[0])


def test_extracted_vectors_are_each_blocks_share_of_the_demonstrations_effect(lm):
  model, params, sequence = lm
  episodes = _episodes(6, 2)
  vectors = icv.extract(model, params, sequence, episodes, scale=0.5, batch_size=4)
  alone = [icv.zero_shot(ep) for ep in episodes]
  states = {}
  for name, eps in (("with", episodes), ("without", alone)):
    tokens, mask, _ = icv.prompts(icv.fitted(sequence, eps), eps)
    states[name] = [np.asarray(s, np.float64).mean(axis=0) for s in _block_loop(model, params, tokens, mask)[1]]
  delta = [w - o for w, o in zip(states["with"], states["without"])]
  np.testing.assert_allclose(vectors["layers_0"]["vector"], 0.5 * delta[0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(vectors["layers_1"]["vector"], 0.5 * (delta[1] - delta[0]), rtol=1e-4, atol=1e-5)


def _live_objective(model, params, sequence, episodes, vectors):
  """LIVE's objective over all episodes, in float64 NumPy from the two models' last-position logits."""
  alone = [icv.zero_shot(ep) for ep in episodes]
  tokens, mask, _ = icv.prompts(icv.fitted(sequence, episodes), episodes)
  teacher = np.asarray(model.apply({"params": params}, tokens, mask=mask)[0][:, -1], np.float64)
  tokens, mask, _ = icv.prompts(icv.fitted(sequence, alone), alone)
  student = np.asarray(icv.shifted(model).apply({"params": {BASE: params, ADAPTER: vectors}}, tokens,
                                                mask=mask)[0][:, -1], np.float64)
  log_softmax = lambda z: z - np.logaddexp.reduce(z, axis=1, keepdims=True)
  t, q = log_softmax(teacher), log_softmax(student)
  gold = [sequence.tokenizer.ids(ep["answers"][-1])[0] for ep in episodes]
  return np.mean(np.sum(np.exp(t) * (t - q), axis=1) - q[np.arange(len(gold)), gold])


def test_live_training_lowers_its_objective_and_prompts_are_shorter(lm):
  model, params, sequence = lm
  episodes = _episodes(24, 2, train=True)
  vectors, losses = icv.train_live(model, params, sequence, episodes, steps=60, lr=0.3, batch_size=8)
  assert set(vectors) == {"layers_0", "layers_1"} and len(losses) == 60
  zero = jax.tree.map(jnp.zeros_like, vectors)
  before, after = (_live_objective(model, params, sequence, episodes, v) for v in (zero, vectors))
  assert after < 0.95 * before  # Bounded below: a constant shift cannot fit every answer.
  assert icv.prompt_tokens(sequence, [icv.zero_shot(ep) for ep in episodes]) < 0.5 * icv.prompt_tokens(
      sequence, episodes)
