"""Caption packing (`data.pack_text`): the rows, the packed fields, and the text tower on packed
rows against open_clip's own text encoder and against the unpacked tower's gradients."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import models, parallel, tasks, train as train_lib
from mmjax.adapt import wrap as adapt
from mmjax.data import packing
from mmjax.errors import ConfigError
from mmjax.models.text import TextTransformer
from tests.helpers import tiny_config

TEXT = dict(vocab_size=50, width=32, depth=3, mlp_dim=64, num_heads=4, max_len=16, pool="argmax", causal=True)
MODEL = dict(embed_dim=16, image=dict(width=32, depth=1, mlp_dim=64, num_heads=4, patch_size=8, pool="gap"),
             text=TEXT)


def captions(lengths, context, vocab, seed=0, end=None):
  """Rows of random ids ending in `end` (default: the highest id, open_clip's end of text),
  padded with 0; nowhere else `end`."""
  end = vocab - 1 if end is None else end
  rng = np.random.default_rng(seed)
  tokens = np.zeros((len(lengths), context), np.int32)
  for row, n in zip(tokens, lengths):
    ids = rng.integers(1, vocab - 1, n - 1)
    row[:n - 1] = np.where(ids == end, end + 1, ids)
    row[n - 1] = end
  return tokens


def fewest_rows(lengths, context, per_row, rows=()):
  """Brute force: the fewest rows of at most `per_row` captions each that hold every caption
  (`rows`: the (tokens, captions) of the rows the captions before these filled)."""
  if not lengths:
    return len(rows)
  first, rest = lengths[0], lengths[1:]
  best = fewest_rows(rest, context, per_row, rows + ((first, 1),))
  for i, (tokens, count) in enumerate(rows):
    if count < per_row and tokens + first <= context:
      best = min(best, fewest_rows(rest, context, per_row, rows[:i] + ((tokens + first, count + 1),) + rows[i + 1:]))
  return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("per_row", [2, 3])
def test_rows_hold_every_caption_in_few_rows(seed, per_row):
  """Two per row: as few rows as any pairing. More: best fit decreasing is a heuristic (the
  gradient tests' `LENGTHS` take 7 rows of three where 6 would do), here within one row."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 13, 7)
  rows = packing.pack_rows(lengths, 12, per_row)
  fewest = fewest_rows(list(lengths), 12, per_row)
  assert fewest <= len(rows) <= fewest + (per_row > 2)
  assert sorted(c for row in rows for c in row) == list(range(7))
  assert all(len(row) <= per_row and lengths[row].sum() <= 12 for row in rows)


def test_best_fit_leaves_room_for_the_shorter_captions():
  """The 3 joins the 7 (no room left) rather than the 6, where both 2s still fit after it."""
  lengths = np.array([2, 7, 3, 6, 2])
  assert [lengths[row].tolist() for row in packing.pack_rows(lengths, 10, 3)] == [[7, 3], [6, 2, 2]]


def test_packed_fields_place_every_caption_in_its_slot():
  lengths = np.array([9, 3, 16, 1, 7, 12, 4, 5])
  tokens = captions(lengths, 16, 50)
  out = packing.pack_captions(tokens, lengths, per_row=3, divisor=2)
  rows = len(out["text"])
  assert rows == 4  # [16], [12, 4], [9, 7], [5, 3, 1]
  assert out["text_pool"].shape == (rows, 3)
  for i, n in enumerate(lengths):
    row, segment = divmod(int(out["text_slot"][i]), 3)
    columns = np.flatnonzero(out["text_segments"][row] == segment + 1)
    assert len(columns) == n and np.all(np.diff(columns) == 1)
    np.testing.assert_array_equal(out["text"][row, columns], tokens[i, :n])
    np.testing.assert_array_equal(out["text_positions"][row, columns], np.arange(n))
    assert out["text_pool"][row, segment] == columns[-1]
  assert len(set(out["text_slot"].tolist())) == 8
  assert (out["text_segments"] > 0).sum() == lengths.sum()


def test_row_counts_and_refusals():
  # Multiples of 1/32 of the batch and of the batch-sharded devices, at most the batch.
  assert [packing.row_count(32, n) for n in (1, 17, 32)] == [1, 17, 32]
  assert [packing.row_count(32, n, 8) for n in (1, 17)] == [8, 24]
  assert [packing.row_count(4096, n, 8) for n in (1000, 1024, 1025)] == [1024, 1024, 1152]
  assert packing.row_count(33, 33) == 33
  # Another process needs 5 rows: this one packs into 5 too (its 4 pairs alone take 4).
  short = np.full(8, 3)
  out = packing.pack_captions(captions(short, 16, 50), short, 2, agree=lambda rows: max(rows, 5))
  assert len(out["text"]) == 5 and len(packing.pack_captions(captions(short, 16, 50), short, 2)["text"]) == 4
  # Five of them fill a row of 16.
  assert len(packing.pack_captions(captions(short, 16, 50), short, 6)["text"]) == 2
  # Nothing pairs: every caption takes its own row, the whole batch.
  long_ = np.full(4, 10)
  assert len(packing.pack_captions(captions(long_, 16, 50), long_, 6)["text"]) == 4
  with pytest.raises(ConfigError, match="divisible"):
    packing.pack_captions(captions(long_, 16, 50), long_, 2, divisor=3)
  with pytest.raises(ConfigError, match=r"lengths must lie in \[1, 16\]"):
    packing.pack_captions(captions(long_, 16, 50), np.array([10, 10, 17, 10]), 2)
  with pytest.raises(ConfigError, match="pool='last'"):
    packing.pooled_lengths(np.zeros((2, 4), np.int32), "last", 2)


def test_pooled_lengths_follow_the_towers_rule():
  tokens = np.array([[5, 2, 0, 0], [5, 6, 7, 8], [3, 49, 2, 0]])
  np.testing.assert_array_equal(packing.pooled_lengths(tokens, "eos", 2), [2, 4, 3])
  np.testing.assert_array_equal(packing.pooled_lengths(tokens, "argmax", 2), [1, 4, 2])


def _packed(tokens, pool="argmax", eos_id=2, divisor=1, per_row=3):
  out = packing.pack_captions(tokens, packing.pooled_lengths(tokens, pool, eos_id), per_row, divisor)
  return out["text"], packing.model_fields(out)


# 12 captions in 7 rows of one to three; 4 devices round that up to 8 rows, one of them empty.
LENGTHS = [16, 14, 3, 3, 4, 4, 5, 6, 8, 9, 10, 12]


@pytest.mark.parametrize("scan,remat,pool", [(False, "none", "argmax"), (True, "none", "eos"),
                                             (False, "full", "eos"), (True, "full", "argmax")])
def test_packed_gradients_match_the_unpacked_tower(scan, remat, pool):
  """`eos` pools at id 7, not the highest id, and the first caption has none (pooled at its
  last position, 16 tokens): there "argmax" and "eos" disagree."""
  model = models.build({**MODEL, "text": {**TEXT, "scan": scan, "remat_policy": remat, "pool": pool,
                                          "eos_id": 7}})
  tokens = captions(LENGTHS, 16, 50, end=49 if pool == "argmax" else 7)
  if pool == "eos":
    tokens[0] = np.random.default_rng(2).integers(8, 49, 16)
  params = nn.meta.unbox(model.init(jax.random.key(0), text=tokens)["params"])
  rows, fields = _packed(tokens, pool, eos_id=7, divisor=4)
  assert len(rows) == 8 and (fields["segments"] == 0).all(axis=1).sum() == 1
  weights = jax.random.normal(jax.random.key(1), (12, 16))

  def loss(p, packed):
    ztxt = model.apply({"params": p}, text=rows if packed else tokens, text_packing=fields if packed else None)[1]
    return jnp.sum(ztxt * weights)

  grads = [jax.grad(loss)(params, packed) for packed in (False, True)]
  for path, a in jax.tree_util.tree_leaves_with_path(grads[0]):
    b = dict(jax.tree_util.tree_leaves_with_path(grads[1]))[path]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert np.abs(grads[1]["txt"]["pos_embedding"]).sum() > 0


def test_packed_text_embeddings_match_open_clip():
  torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[interop]'")
  open_clip = pytest.importorskip("open_clip", reason="needs open_clip_torch: pip install -e '.[interop]'")
  from mmjax.interop import from_open_clip
  torch.manual_seed(0)
  model = open_clip.CLIP(embed_dim=24, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8),
                         text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=4, layers=2)).eval()
  model_config, params = from_open_clip(model)
  tokens = captions(np.random.default_rng(1).integers(1, 17, 12), 16, 100)
  with torch.no_grad():
    reference = model.encode_text(torch.from_numpy(tokens).long(), normalize=True).numpy()
  rows, fields = _packed(tokens)
  assert len(rows) < len(tokens)
  ztxt = models.build(model_config).apply({"params": params}, text=rows, text_packing=fields)[1]
  np.testing.assert_allclose(ztxt, reference, rtol=1e-5, atol=1e-6)


def test_packed_text_refuses_a_tower_that_reads_the_padding():
  tokens = captions([3, 4], 16, 50)
  rows, fields = _packed(tokens)
  model = models.build({**MODEL, "text": {**TEXT, "pool": "last", "causal": False}})
  params = model.init(jax.random.key(0), text=tokens)["params"]
  with pytest.raises(ConfigError, match="causal text tower"):
    model.apply({"params": params}, text=rows, text_packing=fields)
  with pytest.raises(ConfigError, match="data.pack_text"):
    train_lib.train(tiny_config(data=dict(tiny_config().data, pack_text=True)), "/nonexistent")


def _clip_config(pack_text):
  c = tiny_config(total_steps=2, checkpoint_every=2, log_every=1)
  # Room for two or more shapes captions (up to 25 ids); two blocks, so one masks whole rows by segment.
  c.model.text.update(causal=True, pool="eos", max_len=48, depth=2)
  c.loss.kind = "softmax"
  c.data.pack_text = pack_text
  return c


def test_training_on_packed_captions_follows_the_unpacked_run(tmp_path, monkeypatch):
  """Two steps on 8 devices from the same start: packed and unpacked runs log the same losses and
  gradient norms. (Parameters are not compared: AdamW's first steps scale each gradient to about
  ±lr, so float noise in gradients that are zero in exact arithmetic, such as the key biases',
  becomes a visible difference.)"""
  packed_rows = []
  pack = packing.pack_captions

  def counted(*args):
    out = pack(*args)
    packed_rows.append(len(out["text"]))
    return out
  monkeypatch.setattr(packing, "pack_captions", counted)
  logged = []
  for pack_text in (False, True):
    workdir = str(tmp_path / f"pack_{pack_text}")
    train_lib.train(_clip_config(pack_text), workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      logged.append([(m["loss"], m["grad_norm"]) for m in map(json.loads, f)])
  assert packed_rows == [8, 8]  # Both steps of the packed run, in half the rows.
  assert len(logged[1]) == 2
  np.testing.assert_allclose(logged[1], logged[0], rtol=1e-5)


def test_shapes_captions_pack_into_fewer_rows():
  """The shapes recipe's captions are short: on 8 devices its batch packs into half the rows,
  on one into fewer still with more captions per row. The end-of-text id left unset is the
  tower's default, as the model reads it."""
  c = _clip_config(True)
  c.model.text.eos_id = None
  rows = {}
  for devices, per_row in ((8, 6), (1, 2), (1, 6)):
    c.data.captions_per_row = per_row
    task = tasks.get(c.task)(c, parallel.make_mesh(c.mesh, devices=jax.devices()[:devices]))
    texts = task.tokenizer.encode(["a red circle", "a small blue square above a green triangle"] * 8, task.max_len)
    batch = task.prepare_batch({"image": np.zeros((16, 32, 32, 3), np.float32), "text": texts})
    rows[devices, per_row] = len(batch["text"])
    assert batch["text_slot"].shape == (16,) and batch["text_pool"].shape == (rows[devices, per_row], per_row)
    assert sorted(batch) == sorted(("image", "text") + packing.PACKED_KEYS)
  assert rows[8, 6] == rows[1, 2] == 8 and rows[1, 6] < 8
  c.data.captions_per_row = 0
  with pytest.raises(ConfigError, match="data.captions_per_row must be at least 1; got 0"):
    tasks.get(c.task)(c, parallel.make_mesh(c.mesh))
  del c.data["captions_per_row"]  # A run saved before the key: two per row.
  task = tasks.get(c.task)(c, parallel.make_mesh(c.mesh, devices=jax.devices()[:1]))
  assert task.prepare_batch({"text": texts})["text_pool"].shape == (8, 2)


@pytest.mark.parametrize("method,targets", [
    ("lora", ((r"txt/.*(query|value)/kernel$", 4),)),
    ("prefix", ((r"txt/Encoder_0/encoderblock_\d/MultiHeadDotProductAttention_0$", 3),)),
])
def test_adapted_text_towers_embed_packed_captions_as_unpacked(method, targets):
  """Adapters act token by token (LoRA in the projections; prefix tokens attended by every
  query), so packing leaves them exact; random adapter values make them count."""
  model = adapt.wrap(models.build(MODEL), dict(method=method, targets=targets))
  tokens = captions(LENGTHS, 16, 50)
  params = nn.meta.unbox(model.init(jax.random.key(0), text=tokens)["params"])
  leaves, tree = jax.tree.flatten(params["adapter"])
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params["adapter"] = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  unpacked = model.apply({"params": params}, text=tokens)[1]
  base = models.build(MODEL).apply({"params": params["base"]}, text=tokens)[1]
  assert np.abs(unpacked - base).max() > 1e-2
  rows, fields = _packed(tokens, divisor=4)
  packed = model.apply({"params": params}, text=rows, text_packing=fields)[1]
  np.testing.assert_allclose(packed, unpacked, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooled_only", [False, True])
def test_text_tower_pools_packed_rows_with_or_without_the_kept_token_shortcut(pooled_only):
  """The tower alone, packed, against itself unpacked on the same captions; [rows, 3, ...] out."""
  tower = TextTransformer(**{**TEXT, "depth": 2}, num_classes=16)
  tokens = captions(LENGTHS, 16, 50)
  params = nn.meta.unbox(tower.init(jax.random.key(0), tokens)["params"])
  reference = tower.apply({"params": params}, tokens)[0]
  rows, fields = _packed(tokens, divisor=4)
  packed = tower.apply({"params": params}, rows, pooled_only=pooled_only, packing=fields)[0]
  assert packed.shape == (8, 3, 16)
  np.testing.assert_allclose(packed.reshape(24, 16)[fields["slot"]], reference, rtol=1e-5, atol=1e-6)
