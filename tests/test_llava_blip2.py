"""LLaVA and BLIP-2: exact splicing, vision-token selection, projectors and the Q-Former against numpy float64,
cached decoding and generation from spliced embeddings, freezing, config errors.

Parameters are random (no `model.init`, whose initialisers compile slowly on CPU) and large enough that every
one matters; references are built from them independently (numpy, or the bare ViT / Decoder).
"""
import functools
import math

import jax
import numpy as np
import optax
import pytest

from mmjax import rules
from mmjax.config import base_config
from mmjax.errors import ConfigError
from mmjax.generate import generate
from mmjax.models.llava import build_llava
from mmjax.models.qformer import QFormer, build_blip2
from mmjax.models.vlm import expand_image_tokens
from mmjax.optim import make
from tests.helpers import np_attention, np_layer_norm, random_params

RTOL = 1e-5
VOCAB, IMG, PAD = 61, 60, 1
IMAGE = 16
VISION = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, pool="tok")
LM = dict(vocab_size=VOCAB, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
QFORMER = dict(depth=2, num_queries=3, width=24, num_heads=2, mlp_dim=32, cross_attention_every=2)
PROMPT_LEN, MORE = 16, 3  # Every sequence is a prompt or a prompt + MORE tokens: few shapes, few compilations.
IMAGES = np.random.default_rng(1).uniform(-1, 1, (2, 2, IMAGE, IMAGE, 3)).astype(np.float32)  # B=2 rows, M=2
_erf = np.vectorize(math.erf)


def llava_config(**overrides):
  return {**dict(kind="llava", vision=VISION, lm=LM, image_token_id=IMG, image_size=IMAGE, projector="linear"),
          **overrides}


def blip2_config(**overrides):
  return {**dict(kind="blip2", vision=VISION, lm=LM, qformer=QFORMER, image_token_id=IMG), **overrides}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


@functools.lru_cache(maxsize=None)
def jitted(module, method=None):
  return jax.jit(functools.partial(module.apply, method=method))


def prompt(n, seed=0):
  """Rows of PROMPT_LEN tokens, left-padded, with two images each (runs of `n` image tokens; adjacent in row 1)
  at seed-dependent places among random text; and their mask."""
  rng = np.random.default_rng(seed)

  def text(k):
    return rng.integers(2, IMG, size=k).tolist()

  rows = [text(2) + [IMG] + text(rng.integers(1, 3)) + [IMG] + text(3), text(1) + [IMG, IMG] + text(rng.integers(1, 3))]
  rows = expand_image_tokens(rows, IMG, n)
  tokens = np.array([[PAD] * (PROMPT_LEN - len(r)) + r for r in rows], np.int32)
  mask = np.array([[False] * (PROMPT_LEN - len(r)) + [True] * len(r) for r in rows])
  return tokens, mask


def extend(tokens, mask, more):
  """The prompt followed by `more` [B, k] text tokens."""
  return np.concatenate([tokens, more], 1), np.concatenate([mask, np.ones(more.shape, bool)], 1)


def vit_aux(model, params):
  """The bare ViT's aux on IMAGES flattened to [B * M, ...] (image 0 of row 0, image 1 of row 0, ...)."""
  _, aux = jitted(model.vision)({"params": params["vision"]}, IMAGES.reshape(-1, IMAGE, IMAGE, 3))
  return {k: np.asarray(v, np.float64) for k, v in aux.items()}


def dense(p, x):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def spliced_by_hand(params, tokens, mask, visual):
  """LM inputs_embeds: embedding rows of the tokens, the real image-token positions taking `visual` [B, K, D]."""
  embeds = np.asarray(params["lm"]["embedder"]["embedding"], np.float64)[tokens]
  for b in range(len(tokens)):
    where = np.nonzero((tokens[b] == IMG) & mask[b])[0]
    assert len(where) == visual.shape[1]
    embeds[b, where] = visual[b]
  return embeds.astype(np.float32)


@pytest.fixture(scope="module")
def models():
  """name -> (model, params): a LLaVA with a linear projector (vision_layer -2, class token dropped), a BLIP-2."""
  out = {}
  for name, model in (("llava", build_llava(llava_config())), ("blip2", build_blip2(blip2_config()))):
    out[name] = (model, random_params(model, IMAGES, prompt(model.num_image_tokens)[0]))
  return out


def test_expand_image_tokens():
  assert expand_image_tokens([[5, IMG, 7, IMG], [IMG]], IMG, 3) == [[5, IMG, IMG, IMG, 7, IMG, IMG, IMG], [IMG] * 3]


def full_sequence(n):
  """A prompt (seed 0) + MORE random text tokens, and its mask: the sequence the forward-pass tests share."""
  tokens, mask = prompt(n)
  return extend(tokens, mask, np.random.default_rng(4).integers(2, IMG, size=(2, MORE)).astype(np.int32))


def np_projector(p, x):
  """LLaVA's projector in float64: `linear`, or `mlp2x_gelu` with the exact (erf) GELU."""
  x = dense(p["linear_1"], x)
  return dense(p["linear_2"], 0.5 * x * (1 + _erf(x / math.sqrt(2)))) if "linear_2" in p else x


def test_llava_splicing_is_exact(models):
  """LLaVA's logits are the bare Decoder's on embeddings spliced by hand: images in order, runs where the tokens say."""
  model, params = models["llava"]
  tokens, mask = full_sequence(model.num_image_tokens)
  logits, aux = jitted(model)({"params": params}, IMAGES, tokens, mask=mask)
  assert logits.shape == (*tokens.shape, VOCAB) and aux["hidden"].shape == (*tokens.shape, LM["width"])
  # Block -2 = block00 of a 2-block ViT, class token dropped, linear projector; rows of image 0, then image 1.
  visual = np_projector(params["projector"], vit_aux(model, params)["block00"][:, 1:]).reshape(2, -1, LM["width"])
  ref, _ = jitted(model.lm)({"params": params["lm"]}, None, mask=mask,
                            inputs_embeds=spliced_by_hand(params, tokens, mask, visual))
  assert rel_err(logits, ref) <= RTOL, rel_err(logits, ref)
  swapped, _ = jitted(model)({"params": params}, IMAGES[:, ::-1], tokens, mask=mask)
  assert rel_err(swapped, ref) > 1e-2, "swapping the images must change the logits, or the order is not tested"
  padded = np.where(mask, tokens, IMG)  # Image tokens in the padding are not real: no visual token goes there.
  logits_padded, _ = jitted(model)({"params": params}, IMAGES, padded, mask=mask)
  assert rel_err(np.asarray(logits_padded)[mask], np.asarray(ref)[mask]) <= RTOL


@pytest.mark.parametrize("vision_layer,class_token,pool,key,first,projector", [
    (0, True, "tok", "block00", 0, "mlp2x_gelu"), (-1, False, "tok", "block01", 1, "linear"),
    ("encoded", False, "none", "encoded", 0, "linear")])
def test_llava_image_features(vision_layer, class_token, pool, key, first, projector):
  """vision_layer / vision_class_token pick the bare ViT's tokens; the projector matches numpy float64
  (block -2 without the class token is covered by test_llava_splicing_is_exact)."""
  model = build_llava(llava_config(vision={**VISION, "pool": pool}, vision_layer=vision_layer,
                                   vision_class_token=class_token, projector=projector))
  params = random_params(model, IMAGES, np.zeros((2, PROMPT_LEN), np.int32))
  selected = vit_aux(model, params)[key][:, first:]
  assert model.num_image_tokens == selected.shape[1] == 4 + class_token
  features = jitted(model, "image_features")({"params": params}, IMAGES)
  ref = np_projector(params["projector"], selected).reshape(2, -1, LM["width"])
  assert rel_err(features, ref) <= RTOL, rel_err(features, ref)
  if projector == "mlp2x_gelu":
    h = dense(params["projector"]["linear_1"], selected)
    gelu_tanh = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    tanh = dense(params["projector"]["linear_2"], gelu_tanh)
    assert rel_err(features, tanh.reshape(ref.shape)) > 2 * RTOL, "the test must tell the exact GELU from tanh's"


def np_qformer(p, image, depth, cross_attention_every):
  """The pre-norm Q-Former in float64 numpy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.broadcast_to(p["queries"], (image.shape[0],) + p["queries"].shape)
  for i in range(depth):
    lp = p[f"layers_{i}"]
    x = x + np_attention(lp["self_attention"], *[np_layer_norm(lp["self_attention_norm"], x)] * 2)
    if i % cross_attention_every == 0:
      x = x + np_attention(lp["cross_attention"], np_layer_norm(lp["cross_attention_norm"], x), image)
    h = dense(lp["mlp"]["Dense_0"], np_layer_norm(lp["mlp_norm"], x))
    x = x + dense(lp["mlp"]["Dense_1"], 0.5 * h * (1 + _erf(h / math.sqrt(2))))
  return np_layer_norm(p["final_norm"], x)


@pytest.fixture(scope="module")
def qformer():
  model = QFormer(**QFORMER)
  image = np.random.default_rng(2).normal(size=(2, 5, VISION["width"])).astype(np.float32)  # kv width 32 != 24
  return model, random_params(model, image), image


def test_qformer_matches_numpy(qformer):
  model, params, image = qformer
  out = jitted(model)({"params": params}, image)
  assert out.shape == (2, QFORMER["num_queries"], QFORMER["width"])
  assert [("cross_attention" in params[f"layers_{i}"]) for i in range(2)] == [True, False]
  ref = np_qformer(params, image, QFORMER["depth"], QFORMER["cross_attention_every"])
  assert rel_err(out, ref) <= RTOL, rel_err(out, ref)


def test_qformer_sees_a_set_of_image_tokens(qformer):
  """No position information in the cross-attention keys: permuting the image tokens changes nothing;
  changing one token changes the output."""
  model, params, image = qformer
  out = np.asarray(jitted(model)({"params": params}, image))
  permuted = jitted(model)({"params": params}, image[:, np.random.default_rng(3).permutation(image.shape[1])])
  assert rel_err(permuted, out) <= RTOL
  changed = image.copy()
  changed[:, 2] += 1.0
  assert rel_err(jitted(model)({"params": params}, changed), out) > 1e-3


def test_blip2_splicing_and_queries_ignore_the_text(models):
  """ViT -> Q-Former -> projector matches numpy; the same query outputs are spliced whatever the text around them."""
  model, params = models["blip2"]
  queries = np_qformer(params["qformer"], vit_aux(model, params)["encoded"], QFORMER["depth"],
                       QFORMER["cross_attention_every"])
  visual = dense(params["projector"], queries).reshape(2, 2 * QFORMER["num_queries"], LM["width"])
  spliced = []
  for seed in (0, 1):  # Other text, other image-token positions.
    tokens, mask = prompt(model.num_image_tokens, seed)
    embeds = np.asarray(jitted(model, "prompt_embeddings")({"params": params}, IMAGES, tokens, mask))
    spliced.append(np.stack([embeds[b][(tokens[b] == IMG) & mask[b]] for b in range(2)]))
  assert not np.array_equal(*[prompt(model.num_image_tokens, seed)[1] for seed in (0, 1)])
  np.testing.assert_array_equal(spliced[0], spliced[1])
  assert rel_err(spliced[0], visual) <= RTOL, rel_err(spliced[0], visual)
  tokens, mask = full_sequence(model.num_image_tokens)
  logits, _ = jitted(model)({"params": params}, IMAGES, tokens, mask=mask)
  ref, _ = jitted(model.lm)({"params": params["lm"]}, None, mask=mask,
                            inputs_embeds=spliced_by_hand(params, tokens, mask, visual))
  assert rel_err(logits, ref) <= RTOL, rel_err(logits, ref)


@pytest.mark.parametrize("name", ["llava", "blip2"])
def test_cached_decoding_matches_full_forward(models, name):
  """Prefill with the images, then single steps with images=None: the logits of one full forward pass."""
  model, params = models[name]
  tokens, mask = full_sequence(model.num_image_tokens)
  full, _ = jitted(model)({"params": params}, IMAGES, tokens, mask=mask)
  full = np.asarray(full)
  p = PROMPT_LEN
  logits, aux = jitted(model)({"params": params}, IMAGES, tokens[:, :p], mask=mask[:, :p],
                              cache=model.init_cache(2, p + MORE))
  assert rel_err(np.asarray(logits)[mask[:, :p]], full[:, :p][mask[:, :p]]) <= RTOL
  for i in range(p, p + MORE):
    logits, aux = jitted(model)({"params": params}, None, tokens[:, i:i + 1], cache=aux["cache"])
    assert rel_err(logits[:, 0], full[:, i]) <= RTOL, (i, rel_err(logits[:, 0], full[:, i]))


@pytest.mark.parametrize("name", ["llava", "blip2"])
def test_generate_from_prompt_embeddings(models, name):
  """generate() on the LM with the spliced prompt embeddings = greedy decoding by full uncached forward passes."""
  model, params = models[name]
  tokens, mask = prompt(model.num_image_tokens)
  embeds = jitted(model, "prompt_embeddings")({"params": params}, IMAGES, tokens, mask)
  out, _ = generate(model.lm, params["lm"], None, mask, inputs_embeds=embeds, max_new_tokens=MORE, pad_id=PAD)
  # One fixed-length buffer: causal attention keeps the not-yet-written tail from reaching earlier positions.
  buf, buf_mask = extend(tokens, mask, np.zeros((2, MORE), np.int32))
  for i in range(PROMPT_LEN, PROMPT_LEN + MORE):
    logits, _ = jitted(model)({"params": params}, IMAGES, buf, mask=buf_mask)
    buf[:, i] = np.argmax(np.asarray(logits[:, i - 1]), axis=-1)
  np.testing.assert_array_equal(np.asarray(out), buf[:, PROMPT_LEN:])


@pytest.mark.parametrize("name,trained", [("llava", ("projector/",)), ("blip2", ("qformer/", "projector/"))])
def test_frozen_vision_and_lm(models, name, trained):
  """An optimizer step with vision and LM frozen moves exactly the projector (and Q-Former) parameters.

  Every leaf gets a nonzero gradient (random; a real loss's would cost a slow backward compilation), so the
  frozen ones stay put only by the freeze."""
  _, params = models[name]
  optim = base_config().optim
  optim.update(frozen=(r"^vision/", r"^lm/"), warmup_steps=0)
  tx, _ = make(optim, 10, params)
  rng = np.random.default_rng(5)
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  new = optax.apply_updates(params, jax.jit(tx.update)(grads, tx.init(params), params)[0])
  paths = jax.tree.leaves(rules.tree_paths(params))
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new))]
  assert moved == [p.startswith(trained) for p in paths], [p for p, m in zip(paths, moved) if m]
  assert any(moved)


def test_config_errors_name_the_key():
  cases = [
      (build_llava, llava_config(projecter="linear"), r"model\.projecter"),
      (build_llava, llava_config(vision={**VISION, "patch": 8}), r"model\.vision\.patch'"),
      (build_llava, llava_config(lm={**LM, "num_layers": 2}), r"model\.lm\.num_layers"),
      (build_llava, llava_config(projector="mlp3x"), "model.projector='mlp3x'"),
      (build_llava, llava_config(vision_layer=2), "model.vision_layer=2"),
      (build_llava, llava_config(vision={**VISION, "scan": True}), r"scan=True"),
      (build_llava, llava_config(vision={**VISION, "pool": "none"}, vision_class_token=True), "vision_class_token"),
      (build_llava, llava_config(image_size=20), "model.image_size=20"),
      (build_llava, llava_config(image_token_id=VOCAB), f"model.image_token_id={VOCAB}"),
      (build_llava, llava_config(image_token_id=None), r"model\.image_token_id"),
      (build_llava, llava_config(kind="blip2"), "model.kind='blip2'"),
      (build_blip2, blip2_config(vision_layer=-2), r"model\.vision_layer"),
      (build_blip2, blip2_config(qformer={**QFORMER, "layers": 2}), r"model\.qformer\.layers"),
      (build_blip2, blip2_config(qformer={**QFORMER, "width": 25}), "model.qformer.width=25"),
      (build_blip2, blip2_config(qformer={**QFORMER, "cross_attention_every": 0}), "cross_attention_every=0"),
  ]
  for build, cfg, message in cases:
    with pytest.raises(ConfigError, match=message):
      build(cfg)


@pytest.mark.parametrize("name", ["llava", "blip2"])
def test_wrong_image_token_count_raises(models, name):
  """Concrete tokens are checked before anything runs; decode steps (images=None) take no image tokens;
  under jit nothing is checked and the documented fallback holds."""
  model, params = models[name]
  n = model.num_image_tokens
  tokens, mask = prompt(n)
  short = tokens.copy()
  short[0, np.argmax(tokens[0] == IMG)] = 5
  with pytest.raises(ConfigError, match=rf"token rows \[0\] hold \[{2 * n - 1}\] image tokens"):
    model.apply({"params": params}, IMAGES, short, mask=mask)
  with pytest.raises(ConfigError, match=rf"rows \[0, 1\] hold \[{2 * n}, {2 * n}\] image tokens .* expected {n}"):
    model.apply({"params": params}, IMAGES[:, :1], tokens, mask=mask)
  with pytest.raises(ConfigError, match="expected 0"):
    model.apply({"params": params}, None, np.full((2, 1), IMG), cache=model.init_cache(2, 4))
  with pytest.raises(ConfigError, match=r"images of shape \(2, 16, 16, 3\)"):
    model.apply({"params": params}, IMAGES[:, 0], tokens, mask=mask)
  # Under jit the count is not checked: an image token past the 2n visual tokens keeps its token embedding.
  extra = tokens.copy()
  extra[0, -1] = IMG
  embed = jitted(model, "prompt_embeddings")
  got, want = (np.asarray(embed({"params": params}, IMAGES, t, mask)) for t in (extra, tokens))
  np.testing.assert_array_equal(got[:, :-1], want[:, :-1])
  np.testing.assert_array_equal(got[0, -1], np.asarray(params["lm"]["embedder"]["embedding"])[IMG])
  if name == "llava":
    with pytest.raises(ConfigError, match="model.image_size=16"):
      model.apply({"params": params}, np.zeros((2, 2, 32, 32, 3), np.float32), tokens, mask=mask)
