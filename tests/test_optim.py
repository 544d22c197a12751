"""Optimizer groups against hand-derived AdamW steps; regex rules."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax import optim, rules
from mmjax.errors import ConfigError

LR = 0.01


def _config(**kw):
  base = dict(lr=LR, warmup_steps=1, end_lr_fraction=1.0, weight_decay=0.0, b1=0.9, b2=0.999, clip_norm=0.0,
              frozen=(), lr_mults=())
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _params():
  return {"img": {"head": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}},
          "txt": {"head": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}}, "t": jnp.ones((1,))}


def _two_steps(config, grads):
  params = _params()
  tx, _ = optim.make(config, 10, params)
  state = tx.init(params)
  for _ in range(2):  # Step 0 has lr 0 (warmup from zero); step 1 has the full lr.
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_frozen_parameters_stay_bit_identical_and_lr_multipliers_scale_the_step():
  grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), _params())
  out = _two_steps(_config(frozen=("^img/",), lr_mults=(("^txt/head/bias", 0.1),)), grads)
  for leaf in jax.tree.leaves(out["img"]):
    np.testing.assert_array_equal(np.asarray(leaf), 1.0)
  # Adam's bias-corrected step for a constant gradient is lr * sign(g).
  np.testing.assert_allclose(np.asarray(out["txt"]["head"]["kernel"]), 1.0 - LR, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["txt"]["head"]["bias"]), 1.0 - 0.1 * LR, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["t"]), 1.0 - LR, rtol=1e-5)


def test_weight_decay_applies_to_matrices_only():
  grads = jax.tree.map(jnp.zeros_like, _params())
  out = _two_steps(_config(weight_decay=0.5), grads)
  np.testing.assert_allclose(np.asarray(out["img"]["head"]["kernel"]), 1.0 - LR * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["img"]["head"]["bias"]), 1.0)
  np.testing.assert_array_equal(np.asarray(out["t"]), 1.0)


def test_a_warmup_longer_than_the_run_becomes_a_tenth_of_it():
  lr = optim.schedule(_config(warmup_steps=100, end_lr_fraction=0.0), 30)
  assert float(lr(0)) == 0.0 and float(lr(3)) == pytest.approx(LR)  # Peak after 3 = 30 // 10 steps.
  assert float(lr(2)) == pytest.approx(LR * 2 / 3)


def test_schedule_and_rule_errors_name_the_key():
  with pytest.raises(ConfigError, match="optim.warmup_steps"):
    optim.make(_config(warmup_steps=-1), 10, _params())
  with pytest.raises(ConfigError, match="optim.frozen"):
    optim.make(_config(frozen=("img/(",)), 10, _params())


def test_rules_first_match_wins_on_slash_paths():
  values = rules.match([("head/bias$", "b"), ("^img/", "img"), ("head", "h")], _params(), "none")
  assert values == {"img": {"head": {"kernel": "img", "bias": "b"}},
                    "txt": {"head": {"kernel": "h", "bias": "b"}}, "t": "none"}
