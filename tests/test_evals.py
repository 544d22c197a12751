"""Evaluators against brute-force references on embeddings with known answers."""
import numpy as np
import pytest

from mmjax.evals import binding, recall, zeroshot


def _normed(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_retrieval_recall_matches_a_sorting_reference():
  rng = np.random.default_rng(0)
  zimg = _normed(rng.normal(size=(50, 8)))
  ztxt = _normed(zimg + rng.normal(scale=0.9, size=(50, 8)))
  got = recall.evaluate(zimg, ztxt, ks=(1, 5, 10))
  sim = zimg @ ztxt.T
  for prefix, s in (("i2t", sim), ("t2i", sim.T)):
    order = np.argsort(-s, axis=1)
    rank = np.array([list(order[i]).index(i) for i in range(len(s))])
    for k in (1, 5, 10):
      assert got[f"{prefix}_r{k}"] == pytest.approx(np.mean(rank < k))
  assert 0 < got["i2t_r1"] < got["i2t_r10"] < 1  # The data is neither trivial nor hopeless.


def test_zeroshot_ensembles_templates_and_reports_groups():
  vocab = {w: i for i, w in enumerate("a photo of red blue circle square".split())}

  def embed_texts(texts):  # Bag of words, normalised: an independent toy text encoder.
    out = np.zeros((len(texts), len(vocab)))
    for row, text in zip(out, texts):
      for word in text.split():
        row[vocab[word]] += 1
    return _normed(out)

  names = ["red circle", "blue circle", "red square"]
  templates = ("a {}", "a photo of {}")
  zclass = zeroshot.class_embeddings(embed_texts, names, templates)
  want = _normed(np.stack([embed_texts([t.format(n) for t in templates]).mean(0) for n in names]))
  np.testing.assert_allclose(zclass, want, rtol=1e-12)
  # Images that embed exactly like their class, except image 2 which looks like class 0.
  zimg = zclass[[0, 1, 0, 2]]
  labels = np.array([0, 1, 1, 2])
  out = zeroshot.evaluate(zimg, zclass, labels, {"seen": np.array([True, False, True])})
  assert out == {"acc": 0.75, "acc_seen": 1.0}


def test_binding_counts_true_over_swapped():
  zimg = np.eye(3)
  ztrue = np.array([[1.0, 0, 0], [0, 0.2, 0.98], [0, 0, 1]])
  zswap = np.array([[0, 1.0, 0], [0, 1.0, 0], [1, 0, 0]])
  assert binding.evaluate(zimg, ztrue, zswap) == {"acc": pytest.approx(2 / 3)}
