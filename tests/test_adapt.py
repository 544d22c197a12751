"""Adaptation (mmjax.adapt): LoRA, bottleneck adapters and prefix attention against numpy float64
references; adapted runs through the real trainer (frozen base, adapter-only optimizer state,
fsdp-sharded factors), adapter-only exports loaded onto their base, and a LoRA decoder generating.

Unit tests build parameters with `jax.eval_shape` and numpy (random initialisers take XLA:CPU
seconds to compile); the real `init` runs in the trainer and on a standalone attention layer.
"""
import importlib.util
import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import mmjax
from mmjax import bundle, export, models, parallel, runs, tasks
from mmjax import train as train_lib
from mmjax.adapt import lora
from mmjax.adapt import wrap as adapt
from mmjax.checkpoint import Checkpointer
from mmjax.data.tokenizer import load_tokenizer
from mmjax.errors import CheckpointError, ConfigError
from mmjax.generate import generate
from mmjax.models.decoder import SelfAttention, build_decoder
from mmjax.models.layers import MultiHeadDotProductAttention
from mmjax.rules import path_str
from mmjax.tasks.contrastive import model_config_with_vocab
from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK, ALPHA = 4, 6.0
MHA = "MultiHeadDotProductAttention_0"


def _flat(tree) -> dict:
  return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _fill(shapes, seed: int, scale: float = 0.2):
  """Random float32 values for an `eval_shape`d tree (logical-axis boxes kept)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.normal(size=s.shape)).astype(np.float32), shapes)


class Setup:
  """A base module, its inputs, boxed random parameters and its output arrays."""

  def __init__(self, model, args, kwargs, outputs, lora_targets, adapted):
    self.model, self.args, self.kwargs, self.outputs = model, args, kwargs, outputs
    self.lora_targets, self.adapted = lora_targets, adapted
    self.boxed = _fill(jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))["params"], seed=1)
    self.params = nn.unbox(self.boxed)

  def run(self, model, params):
    return [np.asarray(x) for x in self.outputs(model.apply({"params": params}, *self.args, **self.kwargs))]

  def shapes(self, wrapped):
    return jax.eval_shape(lambda: wrapped.init(jax.random.key(0), *self.args, **self.kwargs))["params"]


@pytest.fixture(scope="module")
def two_tower():
  c = tiny_config()
  model = models.build(model_config_with_vocab(c.model, load_tokenizer(c.data.tokenizer)))
  rng = np.random.default_rng(0)
  inputs = dict(image=rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32),
                text=rng.integers(3, 100, (2, 16)).astype(np.int32))
  # Rank 0 first: MAPHead's kernels are skipped although the next rules match them.
  targets = ((r"MAPHead", 0), (r"(query|out)/kernel$", RANK), (r"Dense_0/kernel$", RANK),
             (r"img/embedding/kernel$", RANK))
  block = f"encoderblock_0/{MHA}"
  adapted = {f"{t}/{m}": fan_in for t in ("img/Transformer", "txt/Encoder_0")
             for m, fan_in in ((f"{block}/query/kernel", 1), (f"{block}/out/kernel", 2),
                               ("encoderblock_0/MlpBlock_0/Dense_0/kernel", 1))}
  adapted["img/embedding/kernel"] = 3  # [patch, patch, channels, embed]: three fan-in axes.
  return Setup(model, (), inputs, lambda out: out[:2], targets, adapted)


@pytest.fixture(scope="module")
def decoder():
  model = build_decoder(dict(vocab_size=61, width=32, depth=1, num_heads=4, num_kv_heads=2, mlp_dim=64))
  tokens = np.random.default_rng(0).integers(3, 61, (2, 6)).astype(np.int32)
  targets = ((r"(query|value|out)/kernel$", RANK), (r"feed_forward/down/kernel$", RANK))
  attn = "layers_0/attention"
  adapted = {f"{attn}/query/kernel": 1, f"{attn}/value/kernel": 1, f"{attn}/out/kernel": 2,
             "layers_0/feed_forward/down/kernel": 1}
  return Setup(model, (tokens,), {}, lambda out: out[:1], targets, adapted)


# LoRA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["two_tower", "decoder"])
def test_lora_is_the_base_at_init_and_a_numpy_low_rank_update_after(request, name):
  s = request.getfixturevalue(name)
  wrapped = adapt.wrap(s.model, dict(method="lora", targets=s.lora_targets, alpha=ALPHA))
  boxed = lora.init(s.boxed, s.lora_targets, jax.random.key(1))
  # `wrap(...).init` builds this very tree: its boxes carry the factors' logical axis names.
  shapes = s.shapes(wrapped)
  assert jax.tree.structure(shapes["adapter"]) == jax.tree.structure(boxed)
  assert jax.tree.structure(shapes["base"]) == jax.tree.structure(s.boxed)
  adapter = nn.unbox(boxed)
  base = _flat(s.params)
  factors = _flat(adapter)
  assert {p.rsplit("/", 1)[0] for p in factors} == set(s.adapted)
  for path, k in s.adapted.items():
    w, a, b = base[path], factors[f"{path}/a"], factors[f"{path}/b"]
    assert a.shape == w.shape[:k] + (RANK,) and b.shape == (RANK,) + w.shape[k:], path
    assert not b.any() and a.std() > 0

  # At initialisation (B = 0) the adapted model is the base model, bit for bit.
  init_out = s.run(s.model, s.params)
  for got, want in zip(s.run(wrapped, {"base": s.params, "adapter": adapter}), init_out):
    np.testing.assert_array_equal(got, want)

  rng = np.random.default_rng(2)
  perturbed = jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32), adapter)
  params = {"base": s.params, "adapter": perturbed}
  pf = _flat(perturbed)
  want = dict(base)
  for path, k in s.adapted.items():  # W + alpha/r · A·B on the kernel seen as [fan-in, fan-out].
    w = base[path].astype(np.float64)
    fan_in = int(np.prod(w.shape[:k]))
    ab = pf[f"{path}/a"].astype(np.float64).reshape(fan_in, RANK) @ pf[f"{path}/b"].astype(np.float64).reshape(RANK, -1)
    want[path] = w + ALPHA / RANK * ab.reshape(w.shape)
  merged = wrapped.merged(params)
  got = _flat(merged)
  assert set(got) == set(want)
  for path, w in got.items():
    if path in s.adapted:
      np.testing.assert_allclose(w, want[path], rtol=0, atol=2e-6, err_msg=path)
    else:
      np.testing.assert_array_equal(w, base[path], err_msg=path)

  # The adapted model computes with those kernels; a plain model on merged parameters is the same.
  reference = jax.tree.unflatten(jax.tree.structure(s.params),
                                 [want[path_str(p)].astype(np.float32)
                                  for p, _ in jax.tree_util.tree_leaves_with_path(s.params)])
  adapted_out = s.run(wrapped, params)
  for got_out, ref_out, merged_out, init in zip(adapted_out, s.run(s.model, reference), s.run(s.model, merged),
                                                init_out):
    np.testing.assert_allclose(got_out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merged_out, got_out, rtol=1e-6, atol=1e-6)
    assert np.abs(got_out - init).max() > 1e-3  # The update matters.
  for path, w in _flat(lora.unmerge(merged, perturbed, scale=ALPHA / RANK)).items():
    np.testing.assert_allclose(w, base[path], rtol=0, atol=1e-6, err_msg=path)
  assert lora.count(boxed) == sum(x.size for x in factors.values())


def test_lora_and_wrap_errors_name_the_problem(two_tower):
  s, key = two_tower, jax.random.key(0)
  with pytest.raises(ConfigError, match=r"adapt.targets=\[\('nothing/kernel\$', 4\)\] match no parameter"):
    lora.init(s.boxed, [(r"nothing/kernel$", 4)], key)
  # Plain (unboxed) parameters: a 3-D kernel's fan-in axes are unknown, a matrix is fine.
  query = f"txt/Encoder_0/encoderblock_0/{MHA}/query/kernel"
  with pytest.raises(ConfigError, match=rf"{query} has shape \(32, 2, 16\).*logical axis names"):
    lora.init(s.params, [(r"txt/.*query/kernel$", 4)], key)
  plain = lora.init(s.params, [(r"txt/head/kernel$", 4)], key)
  assert plain["txt"]["head"]["kernel"]["a"].shape == (32, 4)
  with pytest.raises(ConfigError, match=r"txt/head/bias has shape \(32,\)"):
    lora.init(s.params, [(r"txt/head/bias$", 4)], key)
  with pytest.raises(ConfigError, match=r"adapt.method='lorax'; known"):
    adapt.wrap(s.model, dict(method="lorax", targets=((".", 4),)))
  with pytest.raises(ConfigError, match="adapt.targets is empty"):
    adapt.wrap(s.model, dict(method="lora", targets=()))
  with pytest.raises(ConfigError, match=r"ranks \[2, 4\]"):
    adapt.wrap(s.model, dict(method="lora", targets=(("query", 2), ("value", 4)))).lora_scale
  assert adapt.wrap(s.model, dict(method="")) is s.model
  with pytest.raises(ConfigError, match="match no module path"):
    s.shapes(adapt.wrap(s.model, dict(method="adapter", targets=((r"nothing$", 3),))))
  with pytest.raises(ConfigError, match=r"encoderblock_0/MlpBlock_0 \(MlpBlock\) is not one"):
    s.shapes(adapt.wrap(s.model, dict(method="prefix", targets=((r"img/.*encoderblock_0/MlpBlock_0$", 3),))))


# Adapters and prefixes ----------------------------------------------------------------------


def _gelu(x):  # tanh approximation (flax's nn.gelu default)
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_attention(p, x, prefix=None):
  """float64 multi-head attention y = out(softmax(q·kᵀ/√d)·v) + b_out, plus with `prefix`
  tanh(gate)·out(softmax(q·k_pᵀ/√d)·v_p), k_p, v_p the tokens through the key/value projections."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)

  def proj(name, inputs):
    return np.einsum("...d,dhk->...hk", inputs, p[name]["kernel"]) + p[name]["bias"]

  q, k, v = proj("query", x), proj("key", x), proj("value", x)
  d = q.shape[-1]
  y = np.einsum("bhqk,bkhd->bqhd", _softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)), v)
  out = np.einsum("blhk,hkd->bld", y, p["out"]["kernel"]) + p["out"]["bias"]
  if prefix is not None:
    tokens, gate = np.asarray(prefix["tokens"], np.float64), np.asarray(prefix["gate"], np.float64)
    kp, vp = proj("key", tokens), proj("value", tokens)  # [P, heads, d]
    z = np.einsum("bhqp,phd->bqhd", _softmax(np.einsum("bqhd,phd->bhqp", q, kp) / np.sqrt(d)), vp)
    out = out + np.einsum("blhk,hkd->bld", z * np.tanh(gate)[:, None], p["out"]["kernel"])
  return out


@pytest.mark.parametrize("method", ["prefix", "adapter"])
def test_standalone_attention_adapted_matches_numpy(method):
  x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
  attn = MultiHeadDotProductAttention(num_heads=2)
  wrapped = adapt.wrap(attn, dict(method=method, targets=(("^$", 3),), act="gelu"))  # "": the root module.
  params = nn.unbox(wrapped.init(jax.random.key(0), x)["params"])
  extra = params["adapter"][""]
  assert {k: v.shape for k, v in extra.items()} == (
      {"tokens": (3, 8), "gate": (2,)} if method == "prefix" else
      {"down": (8, 3), "down_bias": (3,), "up": (3, 8), "up_bias": (8,)})
  np.testing.assert_array_equal(wrapped.apply({"params": params}, x), attn.apply({"params": params["base"]}, x))

  rng = np.random.default_rng(1)
  base = jax.tree.map(lambda a: (0.5 * rng.normal(size=a.shape)).astype(np.float32), params["base"])
  extra = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), extra)
  got = np.asarray(wrapped.apply({"params": {"base": base, "adapter": {"": extra}}}, x))
  if method == "prefix":
    want = _np_attention(base, x, extra)
  else:  # y + up(gelu(down(y)))
    y = _np_attention(base, x)
    e = jax.tree.map(lambda a: np.asarray(a, np.float64), extra)
    want = y + _gelu(y @ e["down"] + e["down_bias"]) @ e["up"] + e["up_bias"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.abs(want - _np_attention(base, x)).max() > 1e-2  # The method's term matters.


def _np_rope(x, positions, theta):
  """Rotary embedding as a complex rotation: the pair (x_i, x_{i+d/2}) turned by position·theta^(-2i/d)."""
  half = x.shape[-1] // 2
  turn = np.exp(1j * positions[:, :, None, None] * theta ** (-2.0 * np.arange(half) / x.shape[-1]))
  z = (x[..., :half] + 1j * x[..., half:]) * turn
  return np.concatenate([z.real, z.imag], axis=-1)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_prefix_in_a_grouped_query_rope_layer_goes_through_the_door_and_matches_numpy(monkeypatch, impl):
  heads, kv_heads, head_dim, width, theta = 4, 2, 8, 16, 100.0
  layer = SelfAttention(heads, kv_heads, head_dim, rope_theta=theta, use_bias=True, attention_impl=impl)
  wrapped = adapt.wrap(layer, dict(method="prefix", targets=(("^$", 3),)))  # "": the root module.
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 5, width)).astype(np.float32)
  positions = np.array([np.arange(5), np.arange(3, 8)])
  shapes = jax.eval_shape(lambda: wrapped.init(jax.random.key(0), x, positions, None, causal=True))["params"]
  params = nn.unbox(_fill(shapes, seed=5, scale=0.5))
  assert {k: v.shape for k, v in params["adapter"][""].items()} == {"tokens": (3, width), "gate": (heads,)}
  impls = []
  door = adapt.dot_product_attention
  monkeypatch.setattr(adapt, "dot_product_attention", lambda *a, **kw: impls.append(kw.get("impl")) or door(*a, **kw))
  got, _ = wrapped.apply({"params": params}, x, positions, None, causal=True)
  assert impls == [impl]  # The prefix's one softmax, through the door with the layer's impl.

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  base, prefix = p["base"], p["adapter"][""]

  def proj(name, inputs):
    return np.einsum("...d,dhk->...hk", inputs, base[name]["kernel"]) + base[name]["bias"]

  kv_head = np.arange(heads) // (heads // kv_heads)  # Query head j reads key/value head j // group.
  q = _np_rope(proj("query", x.astype(np.float64)), positions, theta)
  k = _np_rope(proj("key", x.astype(np.float64)), positions, theta)[:, :, kv_head]
  v = proj("value", x.astype(np.float64))[:, :, kv_head]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
  logits = np.where(np.tril(np.ones((5, 5), bool)), logits, -np.inf)
  y = np.einsum("bhqk,bkhd->bqhd", _softmax(logits), v)
  plain = np.einsum("blhk,hkd->bld", y, base["out"]["kernel"]) + base["out"]["bias"]
  kp, vp = proj("key", prefix["tokens"])[:, kv_head], proj("value", prefix["tokens"])[:, kv_head]  # [P, heads, d]
  z = np.einsum("bhqp,phd->bqhd", _softmax(np.einsum("bqhd,phd->bhqp", q, kp) / np.sqrt(head_dim)), vp)
  want = plain + np.einsum("blhk,hkd->bld", z * np.tanh(prefix["gate"])[:, None], base["out"]["kernel"])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  assert np.abs(want - plain).max() > 1e-2  # The prefix's term matters.


@pytest.mark.parametrize("name,method,target,zero_init", [
    ("two_tower", "adapter", r"encoderblock_0/MlpBlock_0$", ("up", "up_bias")),
    ("two_tower", "prefix", rf"encoderblock_0/{MHA}$", ("gate",)),
    ("decoder", "prefix", r"layers_0/attention$", ("gate",)),  # RoPE, grouped-query heads, a tuple output.
])
def test_adapter_and_prefix_in_a_model_start_as_the_base(request, name, method, target, zero_init):
  s = request.getfixturevalue(name)
  wrapped = adapt.wrap(s.model, dict(method=method, targets=((target, 3),)))
  shapes = s.shapes(wrapped)
  adapter = _flat(jax.tree.map(lambda x: np.zeros(x.shape), nn.unbox(shapes["adapter"])))
  modules = {p.rsplit("/", 1)[0] for p in adapter}
  want = {"img/Transformer/encoderblock_0", "txt/Encoder_0/encoderblock_0"} if name == "two_tower" else {"layers_0"}
  assert modules == {f"{m}/{target.rsplit('/', 1)[-1][:-1]}" for m in want}
  rng = np.random.default_rng(3)
  leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(shapes["adapter"]))
  values = [np.zeros(x.shape, np.float32) if path_str(p).rsplit("/", 1)[1] in zero_init else
            rng.normal(size=x.shape).astype(np.float32) for p, x in leaves]
  extra = jax.tree.unflatten(jax.tree.structure(nn.unbox(shapes["adapter"])), values)
  base_out = s.run(s.model, s.params)
  for got, want_out in zip(s.run(wrapped, {"base": s.params, "adapter": extra}), base_out):
    np.testing.assert_array_equal(got, want_out)
  extra = jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(np.float32), extra)
  for got, want_out in zip(s.run(wrapped, {"base": s.params, "adapter": extra}), base_out):
    assert np.abs(got - want_out).max() > 1e-3


# Training, export, generation ---------------------------------------------------------------


def _tiny(**overrides):
  return tiny_config(**{"total_steps": 2, "checkpoint_every": 2, "log_every": 2, "eval_every": 0, **overrides})


def _lora_config(base_dir, frozen=(r"^base/",)):
  c = _tiny(mesh=(("data", 2), ("fsdp", 4), ("tensor", 1)), init_from=(("base", base_dir),))
  c.optim.frozen = frozen
  c.adapt.update(dict(method="lora", targets=((r"(query|value)/kernel$", RANK),), alpha=8.0, dropout=0.0,
                      act="gelu"))
  return c


def _restore_state(workdir):
  """The full training state `{"params", "opt", "step"}` of a run's latest checkpoint."""
  config = runs.load_run_config(workdir)
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.axis_rules(config.axis_rules, mesh)
  task = tasks.get(config.task)(config, mesh)
  ckpt = Checkpointer(workdir, keep=3)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = ckpt.restore(ckpt.latest_step(), runs.sharded_state(task, config, mesh, rules)[0])
  ckpt.close()
  return state


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("base"))
  train_lib.train(_tiny(), workdir)
  return workdir


@pytest.fixture(scope="module")
def lora_run(base_run, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lora"))
  train_lib.train(_lora_config(base_run), workdir)
  return workdir


def test_adapted_run_must_freeze_the_base(tmp_path):
  with pytest.raises(ConfigError, match=r"add r'\^base/' .*to optim.frozen \(now \[\]\)"):
    train_lib.train(_lora_config(str(tmp_path / "none"), frozen=()), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")  # Refused before anything was written.
  model = nn.Dense(2)
  with pytest.raises(ConfigError, match=r"optim.frozen \(now \['\^img/'\]\)"):  # Outside the base.
    adapt.wrap_for_task(model, _lora_config("unused", frozen=(r"^img/",)), {})
  recorded = {}
  assert isinstance(adapt.wrap_for_task(model, _lora_config("unused"), recorded), adapt.Adapted)
  assert recorded["adapt"]["method"] == "lora"  # Exports rebuild the adapter from it.
  adapt.wrap_for_task(model, _lora_config("unused", frozen=(r"^base/img/",)), {})  # Parts of the base.
  assert adapt.wrap_for_task(model, _tiny(), {}) is model  # No method: the model itself.


@pytest.mark.slow
def test_lora_run_trains_only_sharded_adapter_factors(base_run, lora_run):
  base = jax.device_get(runs.restore_params(runs.load_run_config(base_run), base_run)[2])
  state = _restore_state(lora_run)
  assert int(state["step"]) == 2
  params = state["params"]
  # The frozen base holds exactly the base run's final parameters.
  assert jax.tree.structure(params["base"]) == jax.tree.structure(base)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params["base"]), base)
  factors = _flat(jax.device_get(params["adapter"]))
  assert len(factors) == 2 * 2 * 3  # a, b of query and value in both towers' block and the MAP head.
  for path, x in factors.items():
    if path.endswith("/b"):  # B starts at zero: the trained adapter moved it.
      assert np.abs(x).max() > 0, path
  # Adam moments exist for the adapter's leaves only: two per adapter parameter, nothing for the base.
  moments = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(state["opt"]) if x.ndim}
  assert all("/adapter/" in p for p in moments), sorted(moments)[:3]
  assert sum(x.size for x in moments.values()) == 2 * adapt.count(params) == 2 * sum(x.size for x in factors.values())
  # A's rows follow the kernel's `embed` axis, split over fsdp=4, and so does its Adam moment.
  a = params["adapter"]["img"]["Transformer"]["encoderblock_0"][MHA]["query"]["kernel"]["a"]
  kernel = params["base"]["img"]["Transformer"]["encoderblock_0"][MHA]["query"]["kernel"]
  assert a.shape == (32, RANK) and a.addressable_shards[0].data.shape == (32 // 4, RANK)
  assert a.sharding.spec[0] == kernel.sharding.spec[0] == "fsdp"
  mu = [x for p, x in moments.items()
        if "/mu/" in p and p.endswith(f"img/Transformer/encoderblock_0/{MHA}/query/kernel/a")]
  assert len(mu) == 1 and mu[0].sharding == a.sharding


def _embed(model, params, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  text = rng.integers(3, 100, (4, 16)).astype(np.int32)
  return [np.asarray(z) for z in model.apply({"params": params}, image=image, text=text)[:2]]


@pytest.mark.slow
def test_adapter_only_export_loads_onto_its_base_export(base_run, lora_run, tmp_path):
  base_out = export.export(base_run, str(tmp_path / "base"))
  adapter_out = export.export(lora_run, str(tmp_path / "adapter"), adapter_only=True)
  full_out = export.export(lora_run, str(tmp_path / "full"))
  with pytest.raises(CheckpointError, match="has no adapter"):
    export.export(base_run, str(tmp_path / "nothing"), adapter_only=True)
  # The adapter-only export holds the adapter's parameters and nothing else.
  trained = jax.device_get(runs.restore_params(runs.load_run_config(lora_run), lora_run)[2])
  with ocp.StandardCheckpointer() as ckptr:
    written = ckptr.restore(os.path.join(adapter_out, "params"))
  assert jax.tree.structure(written) == jax.tree.structure(trained["adapter"])
  jax.tree.map(np.testing.assert_array_equal, written, trained["adapter"])

  with pytest.raises(CheckpointError, match="holds an adapter only"):
    mmjax.load(adapter_out)
  model, params, _ = mmjax.load(adapter_out, base=base_out)
  full_model, full_params, _ = mmjax.load(full_out)
  base_model, base_params, _ = mmjax.load(base_out)
  assert isinstance(model, adapt.Adapted) and model.method == "lora" and not isinstance(base_model, adapt.Adapted)
  got, want, plain = _embed(model, params), _embed(full_model, full_params), _embed(base_model, base_params)
  for g, w, b in zip(got, want, plain):
    np.testing.assert_array_equal(g, w)
    assert np.abs(g - b).max() > 1e-6  # The adapter is applied, not dropped.

  other = tmp_path / "other"  # An export of another model: a wider MLP in the text tower.
  shutil.copytree(base_out, other)
  config = json.loads((other / bundle.MODEL_CONFIG).read_text())
  config["text"]["mlp_dim"] = 128
  (other / bundle.MODEL_CONFIG).write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"different model config .*\(keys \['text'\]\)"):
    bundle.load(adapter_out, base=str(other))


def _lm_config():
  spec = importlib.util.spec_from_file_location("lm_shapes", os.path.join(REPO, "configs", "lm_shapes.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
  c.total_steps, c.optim.warmup_steps, c.log_every, c.eval_every, c.checkpoint_every = 2, 1, 2, 0, 2
  c.data.batch_size = 16
  c.optim.frozen = (r"^base/",)
  c.adapt.update(dict(method="lora", targets=((r"(query|value)/kernel$", RANK),), alpha=8.0))
  return c


@pytest.fixture(scope="module")
def lm_lora_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lm_lora"))
  train_lib.train(_lm_config(), workdir)
  return workdir


@pytest.mark.slow
def test_lora_lm_trains_and_generates_like_the_merged_base(lm_lora_run):
  task, _, params, step = runs.restore_params(runs.load_run_config(lm_lora_run), lm_lora_run)
  params = jax.device_get(params)
  model = task.model
  assert step == 2 and isinstance(model, adapt.Adapted) and model.method == "lora"
  factors = _flat(params["adapter"])
  assert {p.rsplit("/", 2)[0] for p in factors} == {"layers_0/attention/query", "layers_0/attention/value"}
  assert all(np.abs(x).max() > 0 for p, x in factors.items() if p.endswith("/b"))
  merged = model.merged(params)
  assert np.abs(merged["layers_0"]["attention"]["query"]["kernel"]
                - params["base"]["layers_0"]["attention"]["query"]["kernel"]).max() > 0
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, model.vocab_size, (2, 5)).astype(np.int32)
  mask = np.array([[True] * 5, [False, False, True, True, True]])
  ids, scores = generate(model, params, tokens, mask, max_new_tokens=3)
  want_ids, want_scores = generate(model.base, merged, tokens, mask, max_new_tokens=3)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
  assert np.asarray(ids).shape == (2, 3)
