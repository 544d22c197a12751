"""Prompt learning (mmjax.adapt.prompts, tasks/prompt_learning), class data and the base-to-novel
helpers, against references built by hand: numpy formulas and the model's own flax submodules
run without the interception."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import prompt_shapes
from mmjax import bundle, parallel, runs, train
from mmjax import base_to_novel
from mmjax.adapt.prompts import PromptLearner
from mmjax.data import classes, shapes
from mmjax.data.shapes import CLASS_TEMPLATES
from mmjax.errors import ConfigError
from mmjax.models.vit import Encoder1DBlock, MAPHead
from mmjax.tasks.contrastive import ContrastiveTask
from mmjax.tasks.prompt_learning import PromptLearningTask
from tests.helpers import tiny_config, trained_tiny_backbone


def _config(method, depth=1, **prompt):
  """The recipe for `method` on the tiny towers (depth `depth` on both sides), tiny shapes data."""
  c = prompt_shapes.get_config(f"method={method}")
  c.model = tiny_config().model
  c.model.image.depth = c.model.text.depth = depth
  c.init_from = ()
  c.data.update(image_size=32, shots=2, test_per_class=2, batch_size=16)
  c.prompt.update(depth=depth, **prompt)
  c.total_steps, c.checkpoint_every, c.eval_every, c.log_every, c.optim.warmup_steps = 3, 3, 3, 1, 1
  return c


def _unbox(tree):
  return jax.tree.map(lambda x: getattr(x, "value", x), tree, is_leaf=lambda x: hasattr(x, "value"))


class Setup:
  """Tasks (one per method/depth/prompt options) sharing one frozen base model per depth."""

  def __init__(self):
    self.tasks, self.bases = {}, {}

  def task(self, method, depth=1, **prompt):
    key = (method, depth, tuple(sorted(prompt.items())))
    if key not in self.tasks:
      task = PromptLearningTask(_config(method, depth, **prompt), None)
      if depth not in self.bases:  # Initialising the two-tower model is the slow part: once per depth.
        params = _unbox(task.init(jax.random.key(depth), task.dummy_batch(1)))
        self.bases[depth], prompt_params = params["base"], params["prompt"]
      else:
        prompt_params = task.learner.init(jax.random.key(len(self.tasks)), len(task.data.base))
      self.tasks[key] = (task, {"base": self.bases[depth], "prompt": prompt_params})
    return self.tasks[key]


@pytest.fixture(scope="module")
def setup():
  return Setup()


def _images(n, seed=0):
  return np.asarray(jax.random.uniform(jax.random.key(seed), (n, 32, 32, 3), minval=-1.0, maxval=1.0))


def _l2(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _layer_norm(p, x, eps=1e-6):
  x = np.asarray(x, np.float64)
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def _blocks(tower_kw, params, x, replace):
  """The encoder of a tower run block by block with standalone `Encoder1DBlock`s; before block i
  (i >= 1) `replace(i, x)` may overwrite tokens. Returns the normed output (float64)."""
  kw = {k: tower_kw[k] for k in ("mlp_dim", "num_heads", "act", "norm_eps")}
  kw["causal"] = tower_kw.get("causal", False)
  for i in range(tower_kw["depth"]):
    if i:
      x = replace(i, np.array(x))
    x, _ = Encoder1DBlock(**kw).apply({"params": params[f"encoderblock_{i}"]}, jnp.asarray(x, jnp.float32))
  return _layer_norm(params["encoder_norm"], x)


def _text_by_hand(model, base, tokens, ctx, deep=None):
  """Prompted text embeddings: Embed_0 lookup with slots 0..M-1 set to `ctx`, + pos_embedding,
  the blocks (slots set to deep[i-1] before block i), last-token pool, dense head, L2."""
  p, kw = base["txt"], model.text
  m = ctx.shape[-2]
  x = np.asarray(p["Embed_0"]["embedding"], np.float64)[tokens]
  x[:, :m] = ctx
  x = x + np.asarray(p["pos_embedding"])[:, :tokens.shape[1]]

  def replace(i, h):
    h[:, :m] = deep[i - 1]
    return h

  x = _blocks(kw, p["Encoder_0"], x, replace if deep is not None else lambda i, h: h)
  assert kw["pool"] == "last" and kw["head"] == "dense"
  x = x[:, -1] @ np.asarray(p["head"]["kernel"], np.float64) + np.asarray(p["head"]["bias"])
  return _l2(x)


def _image_by_hand(model, base, images, prompts=None):
  """ViT: patch conv as a matmul, + pos_embedding, the class token first (pool 'tok'), `prompts[0]`
  appended after the patch tokens, replaced by `prompts[i]` before block i, dropped before the
  MAP head (image head 'none') or the class token's linear head, L2."""
  p, kw = base["img"], model.image
  ps, b, s = kw["patch_size"], images.shape[0], images.shape[1]
  g = s // ps
  patches = np.asarray(images, np.float64).reshape(b, g, ps, g, ps, 3).transpose(0, 1, 3, 2, 4, 5)
  kernel = np.asarray(p["embedding"]["kernel"], np.float64)
  x = patches.reshape(b, g * g, -1) @ kernel.reshape(-1, kernel.shape[-1]) + np.asarray(p["embedding"]["bias"])
  x = x + np.asarray(p["pos_embedding"])
  if kw["pool"] == "tok":
    x = np.concatenate([np.broadcast_to(np.asarray(p["cls"], np.float64), (b, 1, x.shape[-1])), x], axis=1)
  n = x.shape[1]
  if prompts is not None:
    x = np.concatenate([x, np.broadcast_to(prompts[0], (b,) + prompts[0].shape)], axis=1)

  def replace(i, h):
    if prompts is not None:
      h[:, n:] = prompts[i]
    return h

  x = _blocks(kw, p["Transformer"], x, replace)[:, :n]
  if kw["pool"] == "tok":
    assert kw["head"] == "linear"
    return _l2(x[:, 0] @ np.asarray(p["head"]["kernel"], np.float64))
  assert kw["pool"] == "map" and kw["head"] == "none"
  head = MAPHead(kw["mlp_dim"], kw["num_heads"], kw["act"], norm_eps=kw["norm_eps"])
  return _l2(head.apply({"params": p["MAPHead_0"]}, jnp.asarray(x, jnp.float32)))


def _with(params, **prompt):
  return {"base": params["base"], "prompt": {**params["prompt"], **prompt}}


def _random(key, like, scale=0.5):
  """Normal noise of shape `like` (a shape tuple, or an array whose shape to take)."""
  shape = like if isinstance(like, tuple) else np.shape(like)
  return jax.random.normal(jax.random.key(key), shape) * scale


# 1-5: the prompt learners.

def test_coop_with_init_words_starts_at_the_zero_shot_template_classifier(setup):
  task, params = setup.task("coop", init_words="a photo of a")
  names = [task.data.class_names[c] for c in task.data.base]
  tok = task.tokenizer
  assert task.learner.num_context == 4 and np.all(np.asarray(params["prompt"]["ctx"]) == 0)
  plain = tok.encode([f"a photo of a {n}" for n in names], task.max_len)
  # The prompt rows are the template's tokens with the context slots where "a photo of a" was.
  np.testing.assert_array_equal(task.tokens["base"][:, 4:], plain[:, 4:])
  np.testing.assert_array_equal(plain[:, :4], np.tile(tok.ids("a photo of a"), (len(names), 1)))
  prompted = task.learner.encode_texts(task.model, params["prompt"], params["base"], task.tokens["base"])
  _, frozen, _ = task.model.apply({"params": params["base"]}, text=plain)
  np.testing.assert_array_equal(np.asarray(prompted), np.asarray(frozen))
  # A learned offset moves them (a constant shift would not: LayerNorm removes it).
  shifted = _with(params, ctx=params["prompt"]["ctx"] + _random(1, params["prompt"]["ctx"]))["prompt"]
  other = task.learner.encode_texts(task.model, shifted, params["base"], task.tokens["base"])
  assert np.abs(np.asarray(other) - np.asarray(frozen)).max() > 1e-3


@pytest.mark.parametrize("method,depth", [("coop", 1), ("maple", 2)])
def test_text_context_enters_at_the_embedding_and_block_inputs(setup, method, depth):
  task, params = setup.task(method, depth, init_words="", num_context=3)
  ctx = _random(2, params["prompt"]["ctx"])
  prompt = {**params["prompt"], "ctx": ctx}
  deep = None
  if depth > 1:
    deep = _random(3, params["prompt"]["deep_ctx"])
    prompt["deep_ctx"] = deep
    assert deep.shape == (depth - 1, 3, 32)
  tokens = task.tokens["novel"][:6]
  got = task.learner.encode_texts(task.model, prompt, params["base"], tokens)
  want = _text_by_hand(task.model, params["base"], tokens, np.asarray(ctx), None if deep is None else np.asarray(deep))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
  if depth > 1:  # The deep context matters: a hand run without it is far off.
    without = _text_by_hand(task.model, params["base"], tokens, np.asarray(ctx))
    assert np.abs(without - want).max() > 1e-2


def test_maple_vision_prompts_are_the_coupled_text_prompts_inside_the_vit(setup):
  task, params = setup.task("maple", 2, init_words="", num_context=3)
  wt, wi = 32, 32
  prompt = {**params["prompt"], "ctx": _random(4, (3, wt)), "deep_ctx": _random(5, (1, 3, wt)),
            "coupling": {"w": _random(6, (2, wt, wi), 0.2), "b": _random(7, (2, wi))}}
  # Numpy coupling: layer j's vision prompts = layer j's text prompts @ w[j] + b[j].
  text = [np.asarray(prompt["ctx"], np.float64), np.asarray(prompt["deep_ctx"][0], np.float64)]
  w, b = (np.asarray(prompt["coupling"][k], np.float64) for k in ("w", "b"))
  vision = np.stack([t @ w[j] + b[j] for j, t in enumerate(text)])
  np.testing.assert_allclose(np.asarray(task.learner.vision_prompts(prompt, params["base"])), vision, atol=1e-5)
  images = _images(4)
  zimg, _ = task.learner.encode_images(task.model, prompt, params["base"], images)
  want = _image_by_hand(task.model, params["base"], images, vision)
  np.testing.assert_allclose(np.asarray(zimg), want, atol=2e-5)
  # The prompts change the embedding (so the comparison above tests their placement) ...
  frozen = _image_by_hand(task.model, params["base"], images)
  assert np.abs(frozen - want).max() > 1e-2
  # ... and the hand-built frozen path is the model's own forward.
  np.testing.assert_allclose(np.asarray(task.model.apply({"params": params["base"]}, image=images)[0]), frozen,
                             atol=2e-5)


def test_maple_vision_prompts_in_a_class_token_vit():
  """CLIP's image tower (class token, linear head) computes its last block for the class token only;
  the prompts appended after the patches must still reach it."""
  c = _config("maple", 2, init_words="", num_context=3)
  c.model.image.update(pool="tok", head="linear")
  task = PromptLearningTask(c, None)
  params = _unbox(task.init(jax.random.key(0), task.dummy_batch(1)))
  prompt = {**params["prompt"], "ctx": _random(4, (3, 32)), "deep_ctx": _random(5, (1, 3, 32)),
            "coupling": {"w": _random(6, (2, 32, 32), 0.2), "b": _random(7, (2, 32))}}
  vision = np.asarray(task.learner.vision_prompts(prompt, params["base"]), np.float64)
  images = _images(4)
  zimg, _ = task.learner.encode_images(task.model, prompt, params["base"], images)
  np.testing.assert_allclose(np.asarray(zimg), _image_by_hand(task.model, params["base"], images, vision),
                             atol=2e-5)
  np.testing.assert_allclose(np.asarray(task.model.apply({"params": params["base"]}, image=images)[0]),
                             _image_by_hand(task.model, params["base"], images), atol=2e-5)


def test_cocoop_meta_net_adds_an_image_token_to_every_context_vector(setup):
  task, params = setup.task("cocoop")
  prompt = dict(params["prompt"])
  meta = prompt["meta_net"]
  assert meta["linear1"]["w"].shape == (32, 2) and meta["linear2"]["w"].shape == (2, 32)  # width / 16.
  prompt["ctx"] = _random(8, prompt["ctx"], 0.1)
  prompt["meta_net"] = {k: {"w": v["w"], "b": _random(9 + i, v["b"], 0.3)} for i, (k, v) in enumerate(meta.items())}
  z = np.asarray(_l2(_random(12, (3, 32))), np.float32)
  got = np.asarray(task.learner.context(prompt, params["base"], z))
  table = np.asarray(params["base"]["txt"]["Embed_0"]["embedding"], np.float64)
  ctx0 = table[task.learner.init_ids] + np.asarray(prompt["ctx"], np.float64)  # init_words "a photo of a".
  m1, m2 = ({k: np.asarray(v, np.float64) for k, v in prompt["meta_net"][n].items()} for n in ("linear1", "linear2"))
  for i in range(3):
    pi = np.maximum(z[i] @ m1["w"] + m1["b"], 0.0) @ m2["w"] + m2["b"]
    np.testing.assert_allclose(got[i], ctx0 + pi[None, :], atol=1e-5)
  # Image-conditioned classes: two images give two sets of class embeddings; one image, one set.
  images = _images(2, seed=1)
  zimg, _ = task.learner.encode_images(task.model, prompt, params["base"], images)
  tokens = task.tokens["base"][:4]
  per_image = [np.asarray(task.learner.encode_texts(task.model, prompt, params["base"], tokens,
                                                    jnp.repeat(zimg[i:i + 1], 4, axis=0))) for i in range(2)]
  assert np.abs(per_image[0] - per_image[1]).max() > 1e-4
  logits, _, _ = task.class_logits(_with(params, **prompt), images, "base")
  t = float(np.exp(params["base"]["t"][0]))
  np.testing.assert_allclose(np.asarray(logits)[:, :4],
                             t * np.stack([per_image[i] @ np.asarray(zimg[i]) for i in range(2)]), rtol=1e-4,
                             atol=1e-4)


def test_coprompt_starts_as_maple_and_adds_the_consistency_loss(setup):
  maple, mparams = setup.task("maple", 2)
  co, cparams = setup.task("coprompt", 2, consistency=0.7)
  assert np.all(np.asarray(cparams["prompt"]["adapters"]["img"]["up"]["w"]) == 0)
  shared = {k: v for k, v in cparams["prompt"].items() if k != "adapters"}
  assert set(shared) == set(mparams["prompt"])
  images = _images(4, seed=2)
  base = cparams["base"]
  z_co, _ = co.learner.encode_images(co.model, cparams["prompt"], base, images)
  z_ma, _ = maple.learner.encode_images(maple.model, shared, base, images)
  np.testing.assert_allclose(np.asarray(z_co), np.asarray(z_ma), atol=1e-6)
  t_co = co.learner.encode_texts(co.model, cparams["prompt"], base, co.tokens["novel"])
  t_ma = maple.learner.encode_texts(maple.model, shared, base, maple.tokens["novel"])
  np.testing.assert_allclose(np.asarray(t_co), np.asarray(t_ma), atol=1e-6)

  batch = {"image": images, "label": np.asarray(co.data.base[[0, 3, 5, 3]], np.int32)}
  loss, metrics = co.loss_fn(cparams, batch, jax.random.key(0))
  metrics = {k: float(v) for k, v in metrics.items()}
  assert float(loss) == metrics["loss"]
  assert metrics["consistency"] > 1e-3
  np.testing.assert_allclose(metrics["loss"] - metrics["ce"], 0.7 * metrics["consistency"], rtol=1e-5)
  # The consistency term by hand: cosine distances to the frozen image embedding and to the frozen
  # template-ensemble class embedding.
  frozen_img = np.asarray(co.model.apply({"params": base}, image=images)[0], np.float64)
  names = [co.data.class_names[c] for c in co.data.base]
  prompts = co.tokenizer.encode([t.format(n) for n in names for t in CLASS_TEMPLATES], co.max_len)
  frozen_txt = np.asarray(co.model.apply({"params": base}, text=prompts)[1], np.float64)
  frozen_txt = _l2(frozen_txt.reshape(len(names), len(CLASS_TEMPLATES), -1).mean(1))
  _, zimg, ztxt = co.class_logits(cparams, images, "base")
  want = (np.mean(1 - np.sum(_l2(zimg) * frozen_img, -1)) + np.mean(1 - np.sum(_l2(ztxt) * frozen_txt, -1)))
  np.testing.assert_allclose(metrics["consistency"], want, rtol=1e-4)
  # Cross-entropy by hand over the base classes.
  logits = np.asarray(co.class_logits(cparams, images, "base")[0], np.float64)
  labels = np.searchsorted(co.data.base, batch["label"])
  top = logits.max(1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
  np.testing.assert_allclose(metrics["ce"], -logp[np.arange(4), labels].mean(), rtol=1e-5)
  # MaPLe has no consistency term.
  _, mmetrics = maple.loss_fn(mparams, batch, jax.random.key(0))
  assert "consistency" not in mmetrics and float(mmetrics["loss"]) == float(mmetrics["ce"])


# 6: training.

@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
  """An export of the depth-1 base model trained until its zero-shot classifier beats chance, to start
  prompt runs from, and its parameters. (On a random base, all classes score alike and CoOp's loss stays
  at ln 24.)"""
  _, out = trained_tiny_backbone(tmp_path_factory)
  return out, bundle.load(out)[1]


def test_coop_training_moves_only_the_prompt_and_reports_base_to_novel(backbone, tmp_path):
  out, base = backbone
  c = _config("coop")
  c.init_from = (("base", out),)
  summary = train.train(c, str(tmp_path / "coop"))
  a, b = summary["base_acc"], summary["novel_acc"]
  # 24 classes x 2 images: chance (1/24) is 2 of the 48. Measured 15 (base) and 22 (novel), about the backbone's
  # zero-shot 18 and 19 (a random base: 1 and 2); 3 steps of CoOp are not expected to improve on it.
  assert min(a, b) >= 3 / 24, "want 3 x chance"
  assert a * 48 == pytest.approx(round(a * 48))
  assert summary["hm"] == pytest.approx(2 * a * b / (a + b) if a + b else 0.0)
  restored = runs.load_params(str(tmp_path / "coop"))
  leaves = jax.tree_util.tree_leaves_with_path(restored["base"])
  want = dict(jax.tree_util.tree_leaves_with_path(base))
  assert len(leaves) == len(want)
  for path, x in leaves:
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want[path]), err_msg=jax.tree_util.keystr(path))
  # The context started at zero (an offset from "a photo of a") and moved.
  ctx = np.asarray(restored["prompt"]["ctx"])
  assert np.abs(ctx).max() > 1e-5


# 7: class data.

def test_class_split_is_a_seeded_disjoint_partition():
  base, novel = classes.class_split(48, 0.5, seed=3)
  assert len(base) == len(novel) == 24
  assert not set(base) & set(novel) and set(base) | set(novel) == set(range(48))
  assert list(base) == sorted(base) and list(novel) == sorted(novel)
  again = classes.class_split(48, 0.5, seed=3)
  np.testing.assert_array_equal(again[0], base)
  assert not np.array_equal(classes.class_split(48, 0.5, seed=4)[0], base)
  assert len(classes.class_split(10, 0.3, seed=0)[0]) == 3
  with pytest.raises(ConfigError, match="data.base_fraction"):
    classes.class_split(3, 0.1, seed=0)


def test_kshot_indices_draws_k_per_class_deterministically():
  labels = np.random.default_rng(5).integers(0, 5, size=200)
  idx = classes.kshot_indices(labels, 4, seed=7)
  assert np.all(np.diff(idx) > 0)  # Sorted, no repeats.
  np.testing.assert_array_equal(np.bincount(labels[idx], minlength=5), [4] * 5)
  np.testing.assert_array_equal(idx, classes.kshot_indices(labels, 4, seed=7))
  assert not np.array_equal(idx, classes.kshot_indices(labels, 4, seed=8))
  sub = classes.kshot_indices(labels, 3, classes=[3, 1], seed=0)
  np.testing.assert_array_equal(np.bincount(labels[sub], minlength=5), [0, 3, 0, 3, 0])


def test_kshot_indices_names_the_short_class():
  labels = np.array([0] * 5 + [1] * 2 + [2] * 5)
  with pytest.raises(ConfigError, match="class 1 has 2 examples.*k=3"):
    classes.kshot_indices(labels, 3)
  with pytest.raises(ConfigError, match="class 4 has 0"):
    classes.kshot_indices(labels, 1, classes=[0, 4])


def test_shapes_class_data_shots_and_test_sets():
  c = _config("coop")
  c.data.update(shots=3, test_per_class=2, split_seed=1)
  data = classes.load(c.data)
  np.testing.assert_array_equal(data.base, classes.class_split(48, 0.5, 1)[0])
  labels = data.train.labels
  assert len(data.train) == 3 * 24 and set(labels) == set(data.base)
  assert all((labels == k).sum() == 3 for k in data.base)
  record = data.train[5]
  assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8
  for split, ids in (("base", data.base), ("novel", data.novel)):
    images, split_labels = data.test_set(split)
    assert len(images) == 2 * len(ids) and split_labels.min() >= 0 and split_labels.max() == len(ids) - 1
    # Each test image is its class's zero-shot stream image: the label indexes this split's classes.
    for j in (0, 7, len(ids) - 1):
      rows = np.flatnonzero(split_labels == j)
      expected = shapes.class_images([ids[j]], 2, seed=0, image_size=32)[0]
      np.testing.assert_array_equal(images[rows], expected)
  shots = {data.train[i]["image"].tobytes() for i in range(len(data.train))}
  assert not shots & {x.tobytes() for x in data.test_images}


def _folder(root, counts):
  """root/<name>/<i>.png, 32x32 noise; pixel (0, 0) = (class index, file index, 77) identifies it."""
  rng = np.random.default_rng(0)
  for ci, (name, n) in enumerate(sorted(counts.items())):  # Folder order: sorted.
    os.makedirs(root / name)
    for i in range(n):
      image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
      image[0, 0] = (ci, i, 77)
      Image.fromarray(image).save(root / name / f"{i}.png")
  return str(root)


def _folder_data(root, **over):
  c = _config("coop")
  c.data.update(source="image_folder", image_root=root, shots=2, test_per_class=10, **over)
  return classes.load(c.data)


def test_image_folder_gives_k_shots_per_base_class_and_disjoint_test_images(tmp_path):
  counts = {"red_square": 5, "green_circle": 4, "blue_star": 6, "white_cross": 5}
  root = _folder(tmp_path / "f", counts)
  data = _folder_data(root)
  names = sorted(counts)
  assert data.class_names == [n.replace("_", " ") for n in names]
  np.testing.assert_array_equal(data.base, classes.class_split(4, 0.5, 0)[0])
  ids = lambda images: [tuple(int(v) for v in im[0, 0, :2]) for im in images]  # noqa: E731
  shots = ids(data.train.images)
  assert all(data.train[i]["label"] == shots[i][0] for i in range(len(shots)))
  for k in range(4):
    picked = [s for s in shots if s[0] == k]
    assert len(picked) == (2 if k in data.base else 0)
  test = ids(data.test_images)
  assert not set(shots) & set(test)
  # The test set is every file that is not a shot.
  everything = {(k, i) for k, n in enumerate(names) for i in range(counts[n])}
  assert set(test) == everything - set(shots) and len(test) == len(set(test))
  np.testing.assert_array_equal([t[0] for t in test], data.test_labels)
  images, labels = data.test_set("novel")
  assert [data.novel[j] for j in labels] == [t[0] for t in ids(images)]


def test_image_folder_class_short_of_shots_is_named(tmp_path):
  base = classes.class_split(4, 0.5, 0)[0]
  names = ["a_one", "b_two", "c_three", "d_four"]
  short = names[base[-1]]
  root = _folder(tmp_path / "f", {n: (1 if n == short else 4) for n in names})
  with pytest.raises(ConfigError, match=short.replace("_", " ") + "|" + short):
    _folder_data(root)


# 8: errors.

def test_prompt_config_errors_name_the_key(setup):
  task, _ = setup.task("coop")
  model_config, tok = task.model_config, task.tokenizer
  ok = dict(method="coop", num_context=4, init_words="a photo of a", depth=1)
  PromptLearner(model_config, ok, tok)
  cases = [(dict(method="prefix"), "prompt.method"),
           (dict(method="cocoop", class_specific=True), "prompt.class_specific"),
           (dict(num_context=3), "prompt.init_words"),
           (dict(method="maple", depth=2), "prompt.depth")]
  for change, key in cases:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
      PromptLearner(model_config, {**ok, **change}, tok)
  # The task raises them from the config, before any parameter is made.
  with pytest.raises(ConfigError, match=r"model\.text\.depth=1"):
    c = _config("maple", 1)
    c.prompt.depth = 3
    PromptLearningTask(c, None)
  deep_text_only = dict(model_config, image=dict(model_config["image"], depth=2))
  with pytest.raises(ConfigError, match=r"model\.text\.depth"):
    PromptLearner(deep_text_only, {**ok, "method": "maple", "depth": 2}, tok)
  deep_image_only = dict(model_config, text=dict(model_config["text"], depth=2))
  with pytest.raises(ConfigError, match=r"model\.image\.depth"):
    PromptLearner(deep_image_only, {**ok, "method": "maple", "depth": 2}, tok)


# 9: base-to-novel helpers.

def test_zeroshot_is_the_template_ensemble_accuracy_and_table_marks_missing(backbone):
  _, base = backbone
  c = _config("coop")
  task = ContrastiveTask(c, parallel.make_mesh(c.mesh))
  data = classes.load(c.data)
  got = base_to_novel.zeroshot(task, base, data)
  apply = jax.jit(lambda image, text: task.model.apply({"params": base}, image=image, text=text)[:2])
  for split, ids in (("base", data.base), ("novel", data.novel)):
    names = [data.class_names[k] for k in ids]
    tokens = task.tokenizer.encode([t.format(n) for n in names for t in CLASS_TEMPLATES], task.max_len)
    ztxt = np.asarray(apply(None, tokens)[1], np.float64).reshape(len(names), len(CLASS_TEMPLATES), -1)
    zclass = _l2(ztxt.mean(1))
    images, labels = data.test_set(split)
    zimg = np.asarray(apply(images.astype(np.float32) / 127.5 - 1.0, None)[0], np.float64)
    scores = zimg @ zclass.T
    top2 = np.sort(scores, 1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-6  # No ties within float32 noise: a well-defined accuracy.
    assert got[f"{split}_acc"] == pytest.approx(np.mean(scores.argmax(1) == labels), abs=1e-12)
  a, b = got["base_acc"], got["novel_acc"]
  assert min(a, b) >= 3 / 24, "want 3 x chance (1/24): measured 18 and 19 of the 48"
  assert got["hm"] == pytest.approx(2 * a * b / (a + b) if a + b else 0.0)
  results = {"zeroshot": {"mean": {**got, "trainable": 0, "seconds": 1.25}},
             "linear_probe": {"mean": {"base_acc": 0.5, "trainable": 66, "seconds": 2.0}}}
  lines = base_to_novel.table(results).splitlines()
  assert lines[2].split() == ["zeroshot", f"{a:.3f}", f"{b:.3f}", f"{got['hm']:.3f}", "0", "1.2"]
  assert lines[3].split() == ["linear_probe", "0.500", "-", "-", "66", "2.0"]
