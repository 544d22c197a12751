"""Flamingo: the LM is unchanged at initialisation, the "immediately preceding media" rule, cached
decoding, freezing the LM and vision tower, a Decoder's parameter tree under "lm", config errors.

One tiny model (16x16 images in 8x8 patches, widths 32, 2 LM layers, M=2 images per sequence) and
a handful of jitted functions shared by every test: XLA:CPU compiles dominate the run time.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import optim, rules
from mmjax.config import base_config
from mmjax.errors import ConfigError
from mmjax.models.decoder import build_decoder
from mmjax.models.flamingo import build_flamingo, media_indices
from mmjax.models.xattn import media_attention_mask

IMG, EOC, PAD = 3, 4, 0
LM = dict(vocab_size=50, width=32, depth=2, num_heads=4, mlp_dim=64)
# Row 0: <image> at 2 and 7. Row 1 (two padding tokens on the left): <image> at 3 and 9.
TOKENS = np.array([[5, 6, IMG, 7, 8, 9, EOC, IMG, 10, 11, 12, 13],
                   [PAD, PAD, 7, IMG, 6, 5, EOC, 11, 12, IMG, 14, 15]], np.int32)
MASK = TOKENS != PAD
FIRST, SECOND = np.array([2, 3]), np.array([7, 9])
POS = np.arange(TOKENS.shape[1])[None, :]
BEFORE_FIRST, BETWEEN, AFTER_SECOND = POS < FIRST[:, None], (POS >= FIRST[:, None]) & (POS < SECOND[:, None]), \
    POS >= SECOND[:, None]


def config(**overrides):
  cfg = dict(kind="flamingo", vision=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8), lm=LM,
             perceiver=dict(depth=1, num_latents=4, num_heads=2, mlp_dim=64, max_media=3), cross_attn_every=1,
             xattn=dict(num_heads=4, mlp_dim=64), image_token_id=IMG, end_of_chunk_id=EOC)
  return {**cfg, **overrides}


def images(seed, batch=2, media=2):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, media, 16, 16, 3)).astype(np.float32)


IMAGES = images(0)


@pytest.fixture(scope="module")
def model():
  return build_flamingo(config())


@pytest.fixture(scope="module")
def params(model):
  """Real initial parameters; with unsafe_rbg keys XLA:CPU compiles the initialisers about 3x faster."""
  variables = jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), IMAGES, TOKENS, mask=MASK)
  return flax.linen.meta.unbox(variables["params"])


@pytest.fixture(scope="module")
def trained(params):
  """Parameters as after some training: every leaf perturbed (so biases are nonzero), gates open."""
  rng = np.random.default_rng(1)
  out = jax.tree.map(lambda p: p + 0.2 * rng.normal(size=p.shape).astype(np.float32), params)
  return with_gates(out, 0.8, -0.6)


def with_gates(params, xattn, dense):
  gates = {k: {**v, "alpha_xattn": jnp.float32(xattn), "alpha_dense": jnp.float32(dense)}
           for k, v in params.items() if k.startswith("xattn_")}
  return {**params, **gates}


@pytest.fixture(scope="module")
def logits_fn(model):
  apply = jax.jit(model.apply)
  return lambda p, imgs: np.asarray(apply({"params": p}, imgs, TOKENS, mask=MASK)[0])


@pytest.fixture(scope="module")
def lm_logits_fn():
  apply = jax.jit(build_decoder(LM).apply)
  return lambda p: np.asarray(apply({"params": p["lm"]}, TOKENS, mask=MASK)[0])


def test_media_indices_and_mask():
  media = media_indices(jnp.asarray(TOKENS), IMG, jnp.asarray(MASK))
  expected = np.where(BEFORE_FIRST, -1, np.where(BETWEEN, 0, 1))
  np.testing.assert_array_equal(media, expected)
  np.testing.assert_array_equal(media_indices(jnp.asarray(TOKENS), IMG, start=jnp.array([[4], [0]]))[:, -1], [6, 2])
  mask = np.asarray(media_attention_mask(jnp.array([[-1, 0, 1, 2]]), num_media=2, num_latents=3))
  assert mask.shape == (1, 1, 4, 6)
  np.testing.assert_array_equal(mask[0, 0], [[0] * 6, [1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [0] * 6])


def test_init_logits_equal_bare_decoder(params, logits_fn, lm_logits_fn):
  assert all(float(params[f"xattn_{i}"][g]) == 0.0 for i in range(2) for g in ("alpha_xattn", "alpha_dense"))
  np.testing.assert_array_equal(logits_fn(params, IMAGES), lm_logits_fn(params))


def test_lm_params_have_a_decoders_tree(model, params):
  decoder = build_decoder(LM)
  shapes = jax.eval_shape(decoder.init, jax.random.PRNGKey(0), TOKENS)["params"]
  shapes = jax.tree.map(lambda x: x.shape, flax.linen.meta.unbox(shapes))
  assert jax.tree.map(np.shape, params["lm"]) == shapes
  assert sorted(params) == ["lm", "perceiver", "vision", "xattn_0", "xattn_1"]
  every2 = build_flamingo(config(cross_attn_every=2))
  tree = jax.eval_shape(every2.init, jax.random.PRNGKey(0), IMAGES, TOKENS)["params"]
  assert sorted(tree) == ["lm", "perceiver", "vision", "xattn_1"]  # Before every 2nd LM layer.


def test_text_before_the_first_image_is_the_bare_lm(trained, logits_fn, lm_logits_fn):
  # Without the dense half, the cross-attention alone leaves tokens with no image yet exactly alone...
  xattn_only = with_gates(trained, 0.8, 0.0)
  ours, bare = logits_fn(xattn_only, IMAGES), lm_logits_fn(xattn_only)
  np.testing.assert_array_equal(ours[BEFORE_FIRST], bare[BEFORE_FIRST])
  assert not np.allclose(ours[~BEFORE_FIRST], bare[~BEFORE_FIRST])
  # ...and with it (it applies to every token) those tokens still do not depend on the images.
  np.testing.assert_array_equal(logits_fn(trained, IMAGES)[BEFORE_FIRST], logits_fn(trained, images(1))[BEFORE_FIRST])


def test_second_image_reaches_only_tokens_from_its_image_token(trained, logits_fn):
  base = logits_fn(trained, IMAGES)
  changed = logits_fn(trained, np.concatenate([IMAGES[:, :1], images(2)[:, 1:]], axis=1))
  np.testing.assert_array_equal(base[~AFTER_SECOND], changed[~AFTER_SECOND])
  assert np.all(np.abs(base - changed).max(-1)[AFTER_SECOND] > 0)


def test_first_image_is_read_only_until_the_next_image(trained, logits_fn):
  new_first = np.concatenate([images(3)[:, :1], IMAGES[:, 1:]], axis=1)
  base, changed = logits_fn(trained, IMAGES), logits_fn(trained, new_first)
  assert np.all(np.abs(base - changed).max(-1)[BETWEEN] > 0)
  # The LM's self-attention carries image 1 forward to later text, so "not after the second
  # <image>" holds for the cross-attention itself: exactly so when the LM moves nothing between
  # positions (value projections zero), making every position's logits a function of its own
  # token and the image it reads.
  isolated = {**trained, "lm": {**trained["lm"], **{
      f"layers_{i}": {**trained["lm"][f"layers_{i}"], "attention": {
          **trained["lm"][f"layers_{i}"]["attention"],
          "value": {"kernel": jnp.zeros_like(trained["lm"][f"layers_{i}"]["attention"]["value"]["kernel"])}}}
      for i in range(LM["depth"])}}}
  base, changed = logits_fn(isolated, IMAGES), logits_fn(isolated, new_first)
  np.testing.assert_array_equal(base[~BETWEEN], changed[~BETWEEN])
  assert np.all(np.abs(base - changed).max(-1)[BETWEEN] > 0)


def test_cached_decoding_matches_full_forward(model, trained, logits_fn):
  prompt_len = 5  # Holds the first <image> of each row; the second arrives token by token.
  batch, length = TOKENS.shape

  @jax.jit
  def decode(p, imgs, tokens, mask):
    cache = model.init_cache(batch, length)
    logits, aux = model.apply({"params": p}, imgs, tokens[:, :prompt_len], mask=mask[:, :prompt_len], cache=cache)

    def step(cache, token):
      step_logits, aux = model.apply({"params": p}, None, token[:, None], cache=cache)
      return aux["cache"], step_logits[:, 0]

    cache, rest = jax.lax.scan(step, aux["cache"], tokens[:, prompt_len:].T)
    return jnp.concatenate([logits, rest.transpose(1, 0, 2)], axis=1), cache

  cached, cache = decode(trained, IMAGES, TOKENS, MASK)
  np.testing.assert_array_equal(cache["media"], [1, 1])
  np.testing.assert_allclose(np.asarray(cached)[MASK], logits_fn(trained, IMAGES)[MASK], rtol=1e-5, atol=1e-5)


def test_frozen_lm_and_vision_get_no_update(model, trained):
  optim_config = base_config().optim
  optim_config.frozen = (r"^lm/", r"^vision/")
  optim_config.warmup_steps = 0
  tx, lr = optim.make(optim_config, 10, trained)
  assert lr(0) > 0

  @jax.jit
  def train_step(p):
    def loss(p):
      logits, _ = model.apply({"params": p}, IMAGES, TOKENS, mask=MASK)
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), TOKENS[:, 1:, None], axis=-1)[..., 0]
      return jnp.sum(nll * MASK[:, 1:]) / jnp.sum(MASK[:, 1:])

    updates, _ = tx.update(jax.grad(loss)(p), tx.init(p), p)
    return optax.apply_updates(p, updates)

  new = train_step(trained)
  paths = rules.tree_paths(trained)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), trained, new)
  for path, moved in zip(jax.tree.leaves(paths), jax.tree.leaves(changed)):
    frozen = path.startswith(("lm/", "vision/"))
    assert moved != frozen, f"{path}: {'updated though frozen' if moved else 'not updated'}"


def test_config_errors(model):
  with pytest.raises(ConfigError, match="model.colour"):
    build_flamingo(config(colour=1))
  with pytest.raises(ConfigError, match="model.perceiver.width"):
    build_flamingo(config(perceiver=dict(depth=1, width=8)))
  with pytest.raises(ConfigError, match="model.xattn.heads"):
    build_flamingo(config(xattn=dict(heads=2)))
  with pytest.raises(ConfigError, match="model.lm.colour"):
    build_flamingo(config(lm=dict(LM, colour=1)))
  with pytest.raises(ConfigError, match="model.vision.colour"):
    build_flamingo(config(vision=dict(variant="mu/8", colour=1)))
  with pytest.raises(ConfigError, match="image_token_id"):
    build_flamingo({k: v for k, v in config().items() if k != "image_token_id"})
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), IMAGES, TOKENS)
  with pytest.raises(ConfigError, match="max_media"):
    jax.eval_shape(model.apply, shapes, images(0, media=4), TOKENS)
  with pytest.raises(ConfigError, match="cache"):
    jax.eval_shape(model.apply, shapes, None, TOKENS)
