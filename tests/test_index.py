"""Embedding index: exact top-k against NumPy on 1 and 8 devices, save/load, and the retrieve CLI end to end."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import mmjax
from mmjax import parallel
from mmjax.data import folder, pipeline, shapes, shapes_vqa
from mmjax.errors import ConfigError, DataError
from mmjax.index import EmbeddingIndex, rag, top_k
from mmjax.retrieve import build
from tests.helpers import tiny_generative_recipe, untrained_export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _numpy_top_k(queries, keys, k):
  scores = queries.astype(np.float64) @ keys.astype(np.float64).T
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("n, k", [(37, 1), (37, 4), (64, 8)])
def test_top_k_matches_numpy(devices, n, k):
  rng = np.random.default_rng(n + k)
  keys, queries = rng.normal(size=(n, 16)).astype(np.float32), rng.normal(size=(5, 16)).astype(np.float32)
  mesh = parallel.make_mesh((("data", devices),), devices=jax.devices()[:devices])
  scores, indices = top_k(queries, keys, k, mesh)
  want_scores, want_indices = _numpy_top_k(queries, keys, k)
  np.testing.assert_array_equal(indices, want_indices)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5)


def test_sharded_top_k_never_returns_padding_rows():
  """37 rows on 8 devices pad 3 zero rows; with every true score negative, an unmasked pad would win."""
  rng = np.random.default_rng(1)
  keys, queries = -rng.uniform(0.1, 1, (37, 4)).astype(np.float32), rng.uniform(0.1, 1, (3, 4)).astype(np.float32)
  scores, indices = top_k(queries, keys, 5, parallel.make_mesh((("data", 8),), devices=jax.devices()[:8]))
  np.testing.assert_array_equal(indices, _numpy_top_k(queries, keys, 5)[1])
  assert (scores < 0).all()

def test_index_saves_loads_and_rejects_bad_input(tmp_path):
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(10, 4)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  index = EmbeddingIndex(emb, [f"item {i}" for i in range(10)], "text")
  loaded = EmbeddingIndex.load(index.save(str(tmp_path / "index")))
  np.testing.assert_array_equal(loaded.embeddings, emb)
  assert loaded.items == index.items and loaded.modality == "text"
  hits = loaded.search(emb[3:4], k=2)[0]
  assert hits[0][1:] == (3, "item 3") and hits[0][0] == pytest.approx(1.0, abs=1e-6)
  with pytest.raises(ConfigError, match=r"k=11 must be in \[1, 10\]"):
    loaded.search(emb[:1], k=11)
  with pytest.raises(ConfigError, match="modality='audio'"):
    EmbeddingIndex(emb, index.items, "audio")
  with pytest.raises(DataError, match="not an embedding index"):
    EmbeddingIndex.load(str(tmp_path))


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
  return untrained_export(str(tmp_path_factory.mktemp("export") / "export"))


def test_load_gives_the_training_preprocessing_and_the_encoders(tiny_export, tmp_path):
  loaded = mmjax.load(tiny_export)
  model, params, tokenizer = loaded  # Still unpacks as before.
  size = loaded.image_size
  # A transparent, non-square image of another size, as a file, a PIL image and a uint8 array.
  rgba = np.random.default_rng(0).integers(0, 256, (37, 50, 4)).astype(np.uint8)
  Image.fromarray(rgba, "RGBA").save(tmp_path / "x.png")
  (tmp_path / "c.jsonl").write_text(json.dumps({"image": "x.png", "caption": "a red circle"}) + "\n")
  training = pipeline.Loader(folder.CaptionFolderSource(tmp_path / "c.jsonl"), tokenizer=None, image_size=size,
                             max_len=0, global_batch_size=1, seed=0)
  want = next(iter(training))["image"]
  assert want.shape == (1, size, size, 3)
  pil = Image.open(tmp_path / "x.png")
  np.testing.assert_array_equal(loaded.preprocess(pil), want)
  np.testing.assert_array_equal(loaded.preprocess([folder.load_image(tmp_path / "x.png")]), want)
  zimg = model.apply({"params": params}, image=want)[0]
  np.testing.assert_allclose(loaded.encode_image([pil]), zimg, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loaded.encode_image(want), zimg, rtol=1e-5, atol=1e-6)
  texts = ["a red circle", "two blue squares"]
  ztxt = model.apply({"params": params}, text=tokenizer.encode(texts, loaded.max_len))[1]
  np.testing.assert_allclose(loaded.encode_text(texts), ztxt, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(loaded.encode_text("a red circle"), axis=-1), 1.0, rtol=1e-5)
  with pytest.raises(ConfigError, match=r"image 0 is float64 \(4, 4\)"):
    loaded.preprocess([np.zeros((4, 4))])


def test_text_index_finds_each_caption_first(tiny_export, tmp_path):
  captions = tmp_path / "captions.jsonl"
  texts = shapes.retrieval_set(0, 32, 12)["captions"]
  assert len(set(texts)) == 12
  repeated = texts + texts[:3] + texts[:1]  # Records 12, 13, 14 and 15 repeat captions 0, 1, 2 and 0.
  captions.write_text("".join(json.dumps({"image": f"{i}.png", "caption": t}) + "\n" for i, t in enumerate(repeated)))
  index, skipped = build(tiny_export, str(tmp_path / "index"), "text", captions=str(captions))
  assert skipped == 0 and index.items == texts
  assert EmbeddingIndex.load(str(tmp_path / "index")).owners[:4] == [[0, 12, 15], [1, 13], [2, 14], [3]]
  best = [hits[0][1] for hits in index.search(index.embeddings, k=1)]
  assert best == list(range(len(texts)))
  found = [item for _, _, item in index.search(index.embeddings[:1], k=len(texts))[0]]
  assert sorted(found) == sorted(texts)  # Each caption once, however often the file repeats it.


def test_retrieve_cli_builds_an_image_index_and_queries_it(tiny_export, tmp_path):
  data = shapes.retrieval_set(1, 40, 6)  # Another size than the model's: the encoder resizes.
  lines = []
  for i, (image, caption) in enumerate(zip(data["images"], data["captions"])):
    Image.fromarray(image).save(tmp_path / f"{i}.png")
    lines.append(json.dumps({"image": f"{i}.png", "caption": caption}))
  (tmp_path / "broken.png").write_bytes(b"not a png")
  lines.append(json.dumps({"image": "broken.png", "caption": "a broken file"}))
  (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")

  def cli(*args):
    result = subprocess.run([sys.executable, "-m", "mmjax.retrieve", *args, "--export", tiny_export],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout

  out = cli("build", "--out", str(tmp_path / "index"), "--captions", str(tmp_path / "captions.jsonl"))
  assert "indexed 6 image rows" in out and "skipped 1 unreadable images" in out
  out = cli("query", "--index", str(tmp_path / "index"), "--image", str(tmp_path / "2.png"), "--text",
            data["captions"][0], "--k", "3")
  lines = out.splitlines()
  image_hits = lines[lines.index(str(tmp_path / "2.png")) + 1:]
  assert image_hits[0].split()[0] == "1" and image_hits[0].split()[2].endswith("2.png")  # Itself, first.
  assert float(image_hits[0].split()[1]) == pytest.approx(1.0, abs=1e-4)
  assert lines[0] == data["captions"][0] and len(lines) == 2 * (1 + 3)


def _unit(x):
  x = x.reshape(len(x), -1).astype(np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_retrieved_demonstrations_are_the_nearest_images_best_last():
  """With raw pixels as the embedding, each query's demonstrations are its nearest pool images, best last."""
  select = lambda queries, pool, k: top_k(_unit(queries), _unit(pool), k)[1]
  episodes = shapes_vqa.retrieved_few_shot_set(select, image_size=16, n=4, shots=3, pool=20)
  source = shapes_vqa.ShapesVQASource(0, 16, 0.2, 20, caption_fraction=0.0, stream=shapes_vqa._SHOTS)
  pool = np.stack([source.record(i)["image"] for i in range(20)])
  for episode in episodes:
    query, demos = episode[-1], episode[:-1]
    order = np.argsort(-(_unit(pool) @ _unit(query["image"][None])[0]), kind="stable")[:3]
    np.testing.assert_array_equal(np.stack([d["image"] for d in demos]), pool[order[::-1]])
    assert all(d["kind"] != "caption" for d in demos)


def test_generative_few_shot_selection_by_config(tiny_export):
  from ml_collections import ConfigDict

  from mmjax.tasks.generative import GenerativeTask
  kw = dict(seed=0, image_size=32, held_out_fraction=0.2)
  few_shot = ConfigDict(dict(n=3, shots=(2,), selection="rices", retriever=tiny_export, pool=16))
  episodes = GenerativeTask._few_shot_set(few_shot, 2, kw)
  assert [len(ep) for ep in episodes] == [3, 3, 3]
  assert [ep[-1]["prompt"] for ep in episodes] == [r["prompt"] for r in shapes_vqa.eval_set(n=3, **kw)]
  few_shot.retriever = ""
  with pytest.raises(ConfigError, match="retriever"):
    GenerativeTask._few_shot_set(few_shot, 2, kw)
  few_shot.selection = "nearest"
  with pytest.raises(ConfigError, match="selection='nearest'"):
    GenerativeTask._few_shot_set(few_shot, 2, kw)


def test_retrieval_augmented_source_puts_each_records_captions_before_its_prompt():
  contexts = [[f"a red circle {i}", f"a blue star {i}"] for i in range(6)]
  source = shapes_vqa.RetrievalAugmentedSource(contexts, image_size=16, media_per_record=2)
  plain = shapes_vqa.ShapesVQASource(0, 16, 0.2, 3, media_per_record=2)
  assert len(source) == 3
  for i in range(3):
    got, want = source[i], plain[i]
    np.testing.assert_array_equal(got["image"], want["image"])
    assert got["answers"] == want["answers"]
    assert got["prompts"] == [f"caption: a red circle {j} caption: a blue star {j} {p}"
                              for j, p in zip((2 * i, 2 * i + 1), want["prompts"])]


def test_caption_pool_is_distinct_and_never_names_a_held_out_combination():
  pool = shapes_vqa.caption_pool(seed=0, n=512)
  assert len(pool) == len(set(pool)) > 300
  seen = set(shapes._seen_combos(0, 0.2))
  held_out = [shapes.class_name(c, s) for c in range(len(shapes.COLOUR_NAMES)) for s in range(len(shapes.SHAPES))
              if (c, s) not in seen]
  assert held_out and not any(name in caption for caption in pool for name in held_out)


@pytest.fixture(scope="module")
def rag_retriever(tiny_export):
  return rag.CaptionRetriever(tiny_export, shapes_vqa.caption_pool(n=40))


def test_caption_retriever_returns_the_captions_nearest_each_image(tiny_export, rag_retriever):
  images = np.stack([r["image"] for r in shapes_vqa.eval_set(image_size=32, n=5)])
  got = rag_retriever(images, 3)
  image_emb = rag_retriever.encoder.encode_image(images).astype(np.float64)
  text_emb = rag_retriever.encoder.encode_text(rag_retriever.index.items).astype(np.float64)
  _, want = _numpy_top_k(_unit(image_emb), _unit(text_emb), 3)
  assert got == [[rag_retriever.index.items[j] for j in row] for row in want]
  # Another retriever of the same export and pool (the eval sets' after the training source's)
  # reuses the loaded export and the embedded captions.
  assert rag.CaptionRetriever(tiny_export, rag_retriever.index.items, "random").index is rag_retriever.index


def test_random_caption_selection_is_seeded_and_distinct(tiny_export):
  pool = shapes_vqa.caption_pool(n=40)
  images = np.zeros((4, 32, 32, 3), np.uint8)
  first, again = (rag.CaptionRetriever(tiny_export, pool, "random", seed=3)(images, 5) for _ in range(2))
  assert first == again and all(len(set(row)) == 5 and set(row) <= set(pool) for row in first)
  assert len({tuple(row) for row in first}) > 1  # Drawn per image, not once.
  with pytest.raises(ConfigError, match="selection='nearest'"):
    rag.CaptionRetriever(tiny_export, pool, "nearest")
  with pytest.raises(ConfigError, match="duplicates"):
    rag.CaptionRetriever(tiny_export, pool + pool[:1])
  with pytest.raises(ConfigError, match=rf"data.rag.k={len(pool) + 1}: must be in \[1, {len(pool)}\]"):
    rag.CaptionRetriever(tiny_export, pool, "random")(images, len(pool) + 1)


def test_rag_recipe_trains_on_retrieved_prompts_and_evaluates_with_them(tiny_export, rag_retriever, tmp_path):
  from mmjax import train as train_lib
  from mmjax.tasks.generative import GenerativeTask
  tiny = dict(width=32, depth=1, num_heads=2, mlp_dim=64)
  overrides = {f"model.{part}.{k}": v for part in ("lm", "vision") for k, v in tiny.items()}
  overrides.update({"init_from": (), "evals.captioning.n": 16, "data.rag.retriever": tiny_export,
                    "data.rag.records": 40, "data.rag.pool": 40})
  config = tiny_generative_recipe("llava_shapes", "rag", **overrides)
  task = GenerativeTask(config, parallel.make_mesh(config.mesh))
  source = task.source(config.data)  # What the trainer reads.
  plain = shapes_vqa.ShapesVQASource(image_size=32, num_records=40)
  want = rag_retriever(np.stack([plain.record(i)["image"] for i in range(40)]), 2)
  assert len(source) == 40 and "contexts=40@" in repr(source)
  assert [source[i]["prompts"][0] for i in range(40)] == [
      f"caption: {a} caption: {b} {plain.record(i)['prompt']}" for i, (a, b) in enumerate(want)]
  summary = train_lib.train(config, str(tmp_path))
  assert {"vqa/accuracy", "captioning/cider"} <= set(summary)
  plain = shapes_vqa.eval_set(image_size=32, n=16)
  want = rag_retriever(np.stack([r["image"] for r in plain]), 2)
  assert [r["prompt"] for r in task._eval_sets()["vqa"]] == [
      f"caption: {a} caption: {b} {r['prompt']}" for r, (a, b) in zip(plain, want)]
  config.data.rag.retriever = ""
  with pytest.raises(ConfigError, match="data.rag.retriever"):
    task.source(config.data)
