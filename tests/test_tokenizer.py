"""SentencePiece tokenizer: encoding layout, training, the shipped shapes model, the CLI."""
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from mmjax.data import shapes, tokenizer
from mmjax.errors import ConfigError, DataError

TEXTS = ["a red circle", "a small blue square at the top left", "two objects: a cat and a dog",
         "the quick brown fox jumps over the lazy dog"] * 20


@pytest.fixture(scope="module")
def shapes_tok():
  return tokenizer.default_shapes_tokenizer()


def test_shapes_tokenizer_round_trips_captions(shapes_tok):
  assert (shapes_tok.pad_id, shapes_tok.eos_id, shapes_tok.vocab_size) == (0, 2, 160)
  src = shapes.ShapesSource(seed=5)
  captions = [src[i]["caption"] for i in range(64)] + shapes.binding_set(n=4)["swapped_captions"]
  ids = shapes_tok.encode(captions, 32)
  assert ids.shape == (len(captions), 32) and ids.dtype == np.int32
  assert not (ids == 1).any()  # No unknown pieces.
  assert shapes_tok.decode(ids) == captions


def test_encode_pads_appends_eos_and_truncates(shapes_tok):
  ids = shapes_tok.encode("a red circle", 16)
  assert ids.shape == (16,)
  n = int((ids != 0).sum())
  assert ids[n - 1] == shapes_tok.eos_id and not ids[n:].any()
  short = shapes_tok.encode("a red circle", 2)
  assert short.tolist() == [ids[0], shapes_tok.eos_id]
  assert shapes_tok.decode(short) == shapes_tok.decode(ids[:1])
  assert shapes_tok.encode(["a", "a red circle"], 4).shape == (2, 4)
  with pytest.raises(ConfigError, match="max_len"):
    shapes_tok.encode("a", 0)


def test_train_is_deterministic_and_picklable(tmp_path):
  tok = tokenizer.train_tokenizer(TEXTS, tmp_path / "a.model", vocab_size=64)
  tokenizer.train_tokenizer(TEXTS, tmp_path / "b.model", vocab_size=64)
  assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
  assert tok.model_proto == (tmp_path / "a.model").read_bytes()
  assert tok.decode(tok.encode(TEXTS[:4], 64)) == TEXTS[:4]
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone.encode(TEXTS[:4], 64), tok.encode(TEXTS[:4], 64))


def test_shipped_model_matches_training_code(tmp_path):
  out = tmp_path / "shapes.model"
  tokenizer.main(["train", "--source", "shapes", "--out", str(out)])
  assert out.read_bytes() == tokenizer.SHAPES_MODEL.read_bytes()


def test_cli_trains_on_caption_file(tmp_path):
  captions = tmp_path / "c.jsonl"
  captions.write_text("\n".join(json.dumps(dict(image=f"{i}.jpg", caption=t))
                                for i, t in enumerate(TEXTS)))
  out = tmp_path / "tok" / "c.model"
  subprocess.run([sys.executable, "-m", "mmjax.data.tokenizer", "train", "--source", "captions",
                  "--captions", str(captions), "--out", str(out), "--vocab_size", "48"],
                 check=True, capture_output=True)
  assert tokenizer.Tokenizer.load(out).decode(tokenizer.Tokenizer.load(out).encode(TEXTS[0], 32)) == TEXTS[0]


def test_a_corpus_too_small_for_the_vocabulary_warns_with_both_sizes(tmp_path):
  with pytest.warns(UserWarning, match=r"vocabulary of \d+ pieces, not the 8000 requested") as record:
    tok = tokenizer.train_tokenizer(TEXTS, tmp_path / "a.model", vocab_size=8000)
  assert str(tok.vocab_size) in str(record[0].message) and tok.vocab_size < 8000
  # Coverage below 1 sends the rarest characters to <unk>: "ü" occurs once in this corpus.
  texts = TEXTS + ["ü" + TEXTS[0]]
  full = tokenizer.train_tokenizer(texts, tmp_path / "full.model", vocab_size=48)
  covered = tokenizer.train_tokenizer(texts, tmp_path / "cov.model", vocab_size=48, character_coverage=0.99)
  assert tokenizer.UNK_ID not in full.encode("ü", 4) and tokenizer.UNK_ID in covered.encode("ü", 4)
  with pytest.raises(ConfigError, match="character_coverage"):
    tokenizer.train_tokenizer(texts, tmp_path / "bad.model", vocab_size=48, character_coverage=0)


def test_load_rejects_bad_models(tmp_path):
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(DataError, match="junk.model"):
    tokenizer.Tokenizer.load(tmp_path / "junk.model")
  with pytest.raises(DataError, match="missing.model"):
    tokenizer.Tokenizer.load(tmp_path / "missing.model")


def _gemma_like_model(path, vocab_size=256_000):
  """A SentencePiece unigram model laid out as big_vision's multilingual (Gemma) one: pad 0, EOS 1,
  BOS 2, unknown 3, the 256 byte pieces for text no piece covers, then whole words and characters."""
  from sentencepiece import sentencepiece_model_pb2 as model_pb2
  proto = model_pb2.ModelProto()
  spec = proto.trainer_spec
  spec.pad_id, spec.eos_id, spec.bos_id, spec.unk_id = 0, 1, 2, 3
  spec.pad_piece, spec.eos_piece, spec.bos_piece, spec.unk_piece = "<pad>", "<eos>", "<bos>", "<unk>"
  spec.model_type, spec.byte_fallback, spec.vocab_size = model_pb2.TrainerSpec.UNIGRAM, True, vocab_size
  proto.normalizer_spec.name = "identity"
  proto.normalizer_spec.add_dummy_prefix = True
  kinds = model_pb2.ModelProto.SentencePiece
  for piece, kind in (("<pad>", kinds.CONTROL), ("<eos>", kinds.CONTROL), ("<bos>", kinds.CONTROL),
                      ("<unk>", kinds.UNKNOWN)):
    proto.pieces.add(piece=piece, score=0.0, type=kind)
  for byte in range(256):
    proto.pieces.add(piece=f"<0x{byte:02X}>", score=0.0, type=kinds.BYTE)
  words = ["\u2581" + w for w in ("a", "red", "circle", "ein", "roter", "kreis", "un", "cercle", "rouge")]
  chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["\u2581", "红", "色", "的", "圆"]
  filler = vocab_size - len(proto.pieces) - len(words) - len(chars)
  for i, piece in enumerate(words + chars + [f"\u2581w{i}" for i in range(filler)]):
    proto.pieces.add(piece=piece, score=-1.0 - (i >= len(words)) * 5 - i * 1e-6, type=kinds.NORMAL)
  path.write_bytes(proto.SerializeToString())
  return path


def test_a_256k_multilingual_sentencepiece_model_by_path_feeds_the_siglip2_text_tower(tmp_path):
  """SigLIP 2's tokenizer is a 256k-piece SentencePiece model given by path: ids span the whole
  vocabulary, text no piece covers falls back to bytes, and the siglip2 recipes' text tower embeds it."""
  import jax
  from configs import siglip2_b16
  from mmjax import models
  from mmjax.tasks.contrastive import model_config_with_vocab
  tok = tokenizer.load_tokenizer(str(_gemma_like_model(tmp_path / "gemma.model")))
  assert tok.vocab_size == 256_000 and tok.eos_id == 1
  ids = tok.encode(["a red circle", "ein roter Kreis", "红色的圆", "ünïcode ✓"], 16)
  assert ids.shape == (4, 16) and ids.max() < 256_000 and (ids[:, -1] == 0).all()
  pieces = [[tok._sp.id_to_piece(int(i)) for i in row if i > 1] for row in ids]
  assert pieces[0] == ["\u2581a", "\u2581red", "\u2581circle"] and pieces[2] == ["\u2581", *"红色的圆"]
  assert "<0xC3>" in pieces[3] and "<0x9C>" in pieces[3]  # Byte fallback: "ü" is C3 BC, "✓" E2 9C 93.
  config = siglip2_b16.get_config()
  assert config.model.text.vocab_size == tok.vocab_size and config.model.text.eos_id == tok.eos_id
  model_config = model_config_with_vocab(config.model, tok)
  model_config["text"].update(variant=None, width=8, depth=1, mlp_dim=16, num_heads=2, scan=False, max_len=16)
  model_config["image_size"] = 32
  model = models.build(model_config)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), text=ids))["params"]
  assert params["txt"]["Embed_0"]["embedding"].value.shape == (256_000, 8)
