"""Model structure and behaviour: parameter counts, scan equivalence, masking, the public API."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import models
from mmjax.errors import ConfigError
from mmjax.models.text import TextTransformer
from mmjax.models.layers import ACTIVATIONS
from mmjax.models.vit import PatchEmbed, ViT, decode_variant

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=4)


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_vit_b16_parameter_count_matches_the_published_model():
  # timm's vit_base_patch16_224 has 86,567,656 parameters: minus its 1000-way head (769,000)
  # and the class token's position embedding (768), which big_vision-style ViTs do not have.
  vit = ViT(**decode_variant("B/16"), pool="tok", posemb="learn")
  shapes = jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert count(nn.unbox(shapes)) == 86_567_656 - 769_000 - 768


def test_patch_embedding_is_the_strided_valid_convolution():
  image = jax.random.normal(jax.random.key(0), (2, 37, 35, 3))  # Remainders a patch does not cover.
  embed = PatchEmbed(width=5, patch_size=8)
  params = nn.unbox(embed.init(jax.random.key(1), image))["params"]
  x, w = np.asarray(image, np.float64), np.asarray(params["kernel"], np.float64)
  expected = np.zeros((2, 4, 4, 5))
  for i in range(4):
    for j in range(4):
      expected[:, i, j] = np.einsum("bpqc,pqcd->bd", x[:, 8 * i:8 * i + 8, 8 * j:8 * j + 8], w)
  expected += np.asarray(params["bias"], np.float64)
  np.testing.assert_allclose(embed.apply({"params": params}, image), expected, rtol=1e-5, atol=1e-5)


def test_exact_gelu_and_its_derivative_match_the_float64_formula():
  x = np.linspace(-9, 9, 721)
  phi = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
  density = np.exp(-x ** 2 / 2) / math.sqrt(2 * math.pi)
  gelu = ACTIVATIONS["gelu"]
  np.testing.assert_allclose(gelu(jnp.asarray(x, jnp.float32)), x * phi, rtol=1e-5, atol=1e-6)
  derivative = jax.vmap(jax.grad(gelu))(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(derivative, phi + x * density, rtol=1e-5, atol=1e-6)


def test_variant_errors_name_the_variant():
  with pytest.raises(ConfigError, match="'Q/16'"):
    decode_variant("Q/16")


@pytest.mark.parametrize("pool,expected", [("tok", (2, 32)), ("gap", (2, 32)), ("map", (2, 32)),
                                           ("none", (2, 16, 32))])
def test_vit_pooling_shapes(pool, expected):
  vit = ViT(**TINY, patch_size=4, pool=pool, posemb="sincos2d")
  x = jnp.ones((2, 16, 16, 3))
  out, aux = vit.apply(vit.init(jax.random.key(0), x), x)
  assert out.shape == expected
  assert aux["encoded"].shape[-1] == 32


def test_scanned_encoder_equals_the_unrolled_one():
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  plain = ViT(**TINY, patch_size=4, pool="map")
  scanned = ViT(**TINY, patch_size=4, pool="map", scan=True, remat_policy="dots")
  params = nn.unbox(plain.init(jax.random.key(0), x))["params"]
  blocks = [params["Transformer"].pop(f"encoderblock_{i}") for i in range(TINY["depth"])]
  stacked = dict(params, Transformer=dict(params["Transformer"],
                                          encoderblock=jax.tree.map(lambda *l: jnp.stack(l), *blocks)))
  params = nn.unbox(plain.init(jax.random.key(0), x))["params"]
  want, _ = plain.apply({"params": params}, x)
  got, _ = scanned.apply({"params": stacked}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  # Scanned parameters carry a leading "layers" logical axis.
  boxed = scanned.init(jax.random.key(0), x)["params"]["Transformer"]["encoderblock"]
  assert boxed["MlpBlock_0"]["Dense_0"]["kernel"].names == ("layers", "embed", "mlp")


def test_causal_text_tower_ignores_later_tokens_and_pools_at_eos():
  tower = TextTransformer(vocab_size=20, max_len=8, pool="eos", causal=True, eos_id=2, **TINY)
  a = jnp.array([[5, 6, 7, 2, 0, 0, 0, 0]])
  b = jnp.array([[5, 6, 7, 2, 9, 9, 9, 9]])  # Differs only after the end-of-text token.
  params = tower.init(jax.random.key(0), a)
  out_a, aux_a = tower.apply(params, a)
  out_b, _ = tower.apply(params, b)
  np.testing.assert_allclose(np.asarray(out_a), np.asarray(out_b), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(aux_a["pre_logits"]), np.asarray(aux_a["encoded"][:, 3]), rtol=1e-6)


def _pooled_both_ways(tower, x, params):
  """The tower's output and pre-logits computed on every token, then pooled at one only."""
  full, full_aux = tower.apply(params, x)
  pooled, pooled_aux = tower.apply(params, x, pooled_only=True)
  np.testing.assert_allclose(np.asarray(pooled), np.asarray(full), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(pooled_aux["pre_logits"]), np.asarray(full_aux["pre_logits"]),
                             rtol=1e-5, atol=1e-6)
  assert "encoded" not in pooled_aux  # Not computed, so not returned.


def _matmul_flops(fn, *args) -> float:
  """2 * m * k * n summed over the program's dot_generals, scan bodies times their length
  (XLA's cost analysis counts a scanned stack's body once), the costliest branch of a cond."""
  def count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "while":
        raise NotImplementedError("a while loop's trip count is not in its jaxpr")
      if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
      for value in eqn.params.values():
        inner = [count(getattr(j, "jaxpr", j)) for j in (value if isinstance(value, (tuple, list)) else [value])
                 if hasattr(getattr(j, "jaxpr", j), "eqns")]
        if inner:
          total += eqn.params.get("length", 1) * max(inner)
    return total
  return count(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("pool,causal,remat,scan,depth", [
    ("eos", True, "none", False, 2), ("argmax", True, "full", False, 2), ("last", False, "none", False, 2),
    ("first", False, "dots", False, 2), ("eos", True, "none", True, 3), ("first", False, "none", True, 1),
    ("argmax", True, "dots", True, 2)])
def test_text_tower_pooled_only_computes_the_last_block_for_the_pooled_token(pool, causal, remat, scan, depth):
  tower = TextTransformer(vocab_size=20, max_len=8, pool=pool, causal=causal, eos_id=19, head="linear",
                          num_classes=8, remat_policy=remat, scan=scan, **dict(TINY, depth=depth))
  # End-of-text (the highest id, 19) at a different position in each row; row 2 has none.
  text = jnp.array([[5, 6, 19, 0, 0, 0, 0, 0], [5, 6, 7, 8, 9, 10, 11, 19], [3, 4, 5, 6, 7, 8, 9, 10]])
  params = tower.init(jax.random.key(0), text)
  _pooled_both_ways(tower, text, params)
  grads = [jax.grad(lambda p, pooled=pooled: jnp.sum(tower.apply(p, text, train=True, pooled_only=pooled)[0] ** 2))(
      params) for pooled in (False, True)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5), *grads)
  # The last block runs for 1 of 8 tokens: about two thirds of its work goes.
  full = _matmul_flops(lambda p, t: tower.apply(p, t)[0], params, text)
  pooled = _matmul_flops(lambda p, t: tower.apply(p, t, pooled_only=True)[0], params, text)
  if scan and remat != "none":  # Slicing the stacked parameters would cost more memory than remat saves.
    assert pooled == full
  else:
    assert full - pooled > 0.6 * full / depth


def test_scanned_tower_pooled_at_one_token_refuses_a_stack_of_another_depth():
  text = jnp.array([[5, 6, 19, 0]])
  deeper = TextTransformer(vocab_size=20, max_len=4, pool="eos", eos_id=19, scan=True, **dict(TINY, depth=3))
  params = deeper.init(jax.random.key(0), text)
  for depth in (1, 2):
    tower = TextTransformer(vocab_size=20, max_len=4, pool="eos", eos_id=19, scan=True, **dict(TINY, depth=depth))
    with pytest.raises(ConfigError, match=r"encoderblock: parameters stacked over \[3\] layers; the model has depth="):
      tower.apply(params, text, pooled_only=True)


@pytest.mark.parametrize("scan", [False, True])
def test_vit_pooled_only_matches_every_token_and_ignores_averaging_pools(scan):
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  for pool in ("tok", "gap", "map"):
    vit = ViT(**TINY, patch_size=4, pool=pool, scan=scan)
    params = vit.init(jax.random.key(0), x)
    if pool == "tok":
      _pooled_both_ways(vit, x, params)
      continue
    out, aux = vit.apply(params, x, pooled_only=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(vit.apply(params, x)[0]), rtol=1e-5, atol=1e-6)
    assert aux["encoded"].shape == (2, 16, 32)  # Averaging pools read every token.


def test_bidirectional_text_tower_sees_every_token():
  tower = TextTransformer(vocab_size=20, max_len=8, pool="last", causal=False, **TINY)
  a = jnp.array([[5, 6, 7, 2, 0, 0, 0, 0]])
  b = jnp.array([[9, 6, 7, 2, 0, 0, 0, 0]])
  params = tower.init(jax.random.key(0), a)
  assert not np.allclose(np.asarray(tower.apply(params, a)[0]), np.asarray(tower.apply(params, b)[0]))


def _two_tower(**kw):
  cfg = dict(image=dict(TINY, patch_size=4, pool="map"), text=dict(TINY, vocab_size=20, max_len=8),
             embed_dim=16, temperature_init=10.0, bias_init=-10.0)
  cfg.update(kw)
  return models.build(cfg)


def test_two_tower_api():
  model = _two_tower()
  image, text = jnp.ones((3, 16, 16, 3)), jnp.ones((3, 8), jnp.int32)
  variables = model.init(jax.random.key(0), image=image, text=text)
  zimg, ztxt, aux = model.apply(variables, image=image, text=text)
  assert zimg.shape == ztxt.shape == (3, 16)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(zimg), axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(ztxt), axis=1), 1.0, rtol=1e-5)
  assert float(aux["t"]) == pytest.approx(10.0) and float(aux["b"]) == pytest.approx(-10.0)
  zimg_only, none, _ = model.apply(variables, image=image)
  assert none is None
  np.testing.assert_allclose(np.asarray(zimg_only), np.asarray(zimg), rtol=1e-6)
  # Every parameter carries logical axis names.
  boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in boxed)


def test_clip_style_has_no_bias():
  model = _two_tower(bias_init=None, temperature_init=1 / 0.07)
  variables = model.init(jax.random.key(0), image=jnp.ones((1, 16, 16, 3)), text=jnp.ones((1, 8), jnp.int32))
  assert "b" not in variables["params"]
  _, _, aux = model.apply(variables, text=jnp.ones((1, 8), jnp.int32))
  assert "b" not in aux and float(aux["t"]) == pytest.approx(1 / 0.07, rel=1e-6)


def test_bfloat16_compute_stays_close_to_float32():
  image = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
  text = jax.random.randint(jax.random.key(3), (4, 8), 3, 20)
  f32 = _two_tower()
  params = f32.init(jax.random.key(0), image=image, text=text)
  bf16 = _two_tower(dtype="bfloat16")
  for a, b in zip(f32.apply(params, image=image, text=text)[:2], bf16.apply(params, image=image, text=text)[:2]):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=3e-2)


def test_build_names_missing_keys():
  with pytest.raises(ConfigError, match="model.image.depth"):
    models.build(dict(image=dict(width=8, mlp_dim=8, num_heads=2), text=dict(TINY, vocab_size=5), embed_dim=4))


def test_text_tower_takes_a_variant_without_a_patch():
  text = models.build(dict(image=dict(variant="mu/8"), text=dict(variant="mu", vocab_size=5), embed_dim=4)).text
  assert (text["width"], text["depth"], text["mlp_dim"], text["num_heads"]) == (32, 1, 128, 2)
  with pytest.raises(ConfigError, match=r"model.text.variant='mu/8': a text tower has no patches; .* \('mu'\)"):
    models.build(dict(image=dict(variant="mu/8"), text=dict(variant="mu/8", vocab_size=5), embed_dim=4))
