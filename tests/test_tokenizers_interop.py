"""CLIP BPE and SigLIP SentencePiece conventions against open_clip and HF transformers; saved tokenizers."""
import importlib.util
import io
import json
import pickle
import random

import numpy as np
import pytest
import sentencepiece as spm

from mmjax.data import tokenizer
from mmjax.data.clip_bpe import ClipBpeTokenizer
from mmjax.errors import ConfigError, DataError

CLIP_TEXTS = [
    "a photo of a cat", "A PHOTO OF A DOG", "Hello, World!!", "what's up? it's they're we'll I'M you'd",
    "café naïve résumé Ångström", "😀🎉 party emoji 👩‍👩‍👧",
    "&amp;lt;b&amp;gt; bold &quot;quoted&quot; &#39;x&#39;", "", "   ", "numbers 123456 and 3.14159, 1e-9",
    "中文字符 日本語のテキスト 한국어", "don't   stop\n\tme now", "İstanbul ǅ Straße ﬁne", "mojibake: Ã©tÃ©",
    "a_b-c.d/e\\f|g", "Ωmega µ ∑ ∞ ≠", "zero\u200bwidth\u00a0nbsp",
    "Kelvin \u212a and 'ſ", "<end_of_text> inside the text", "<START_OF_TEXT>", "x" * 300,
    "the quick brown fox jumps over the lazy dog " * 12, "supercalifragilisticexpialidocious",
    "C++ & C# <html> {json: [1, 2]}", "!!!???...", "tab\tnew\nline\rcarriage", "ÉCOLE ÇA ÜBER",
    "https://example.com/path?q=1&r=2", "email@example.org #hashtag @mention", "αβγ δεζ кириллица ﻉﺮﺒﻳ",
    "Ünïcödé\u0301 combining", "a",
]
SIGLIP_TEXTS = [
    "a photo of a cat", "A Photo Of A DOG.", "the red car, near the tree!",
    "two (small) dogs; sitting-on grass?",
    "MULTI   space\t\ttab\nnewline", "  leading and trailing  ", "", "!!!", "under_score and hy-phen",
    "digits 123 and 4.5", "ÉCOLE café", "▁already▁escaped", "x\u00a0y\u2003z",
    " ".join(["a bright photo of the large house"] * 12),  # Over 63 pieces: cut, EOS kept.
]


@pytest.fixture(scope="module")
def clip_tok():
  try:
    return ClipBpeTokenizer.from_open_clip()
  except DataError as e:
    pytest.skip(f"open_clip's BPE vocabulary is not installed: {e}")


@pytest.fixture(scope="module")
def siglip_model(tmp_path_factory):
  """A tiny unigram model with c4_en's special ids: pad 0, eos 1, unk 2, no bos."""
  rng = random.Random(0)
  words = ("a the red blue green photo of cat dog on in with small large two three bright dark picture "
           "sitting near tree car house man woman grass 1 2 3 4 5").split()
  texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(400)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=120, model_type="unigram", pad_id=0,
      eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, character_coverage=1.0, num_threads=1,
      minloglevel=2)
  path = tmp_path_factory.mktemp("siglip") / "spiece.model"
  path.write_bytes(model.getvalue())
  return path


def test_clip_bpe_matches_open_clip(clip_tok):
  open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is the reference CLIP tokenizer")
  import torch  # open_clip's dependency.
  assert (clip_tok.vocab_size, clip_tok.pad_id, clip_tok.sot_id, clip_tok.eos_id) == (49408, 0, 49406, 49407)
  for max_len in (77, 16):
    ids = clip_tok.encode(CLIP_TEXTS, max_len)
    assert ids.dtype == np.int32 and (ids[:, 0] == clip_tok.sot_id).all()
    np.testing.assert_array_equal(ids, open_clip.tokenize(CLIP_TEXTS, context_length=max_len).numpy())
    cut = ids[:, -1] != 0
    assert cut.sum() >= 2 and (ids[cut, -1] == clip_tok.eos_id).all()
  np.testing.assert_array_equal(clip_tok.encode("A Photo", 77), open_clip.tokenize("A Photo")[0].numpy())
  for row, text in zip(ids, clip_tok.decode(ids)):
    end = row.tolist().index(clip_tok.eos_id)
    assert text == open_clip.decode(torch.from_numpy(row[1:end])).strip()


def test_clip_bpe_round_trips_and_pickles(clip_tok):
  texts = ["a photo of a cat", "hello world", "two dogs playing in the snow"]
  assert clip_tok.decode(clip_tok.encode(texts, 77)) == texts
  assert clip_tok.decode(clip_tok.encode("A Photo!", 77)) == "a photo !"
  clone = pickle.loads(pickle.dumps(clip_tok))
  np.testing.assert_array_equal(clone.encode(CLIP_TEXTS, 32), clip_tok.encode(CLIP_TEXTS, 32))
  with pytest.raises(ConfigError, match="max_len"):
    clip_tok.encode("a", 0)


def test_clip_bpe_errors(tmp_path, monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(DataError, match="pip install open_clip_torch"):
    ClipBpeTokenizer.from_open_clip()
  with pytest.raises(DataError, match="missing.txt.gz"):
    ClipBpeTokenizer(tmp_path / "missing.txt.gz")
  (tmp_path / "junk.txt.gz").write_bytes(b"not gzip")
  with pytest.raises(DataError, match="junk.txt.gz"):
    ClipBpeTokenizer(tmp_path / "junk.txt.gz")


def test_siglip_conventions_match_hf(siglip_model):
  transformers = pytest.importorskip("transformers", reason="HF SiglipTokenizer is the reference")
  hf = transformers.SiglipTokenizer(str(siglip_model))
  tok = tokenizer.Tokenizer.load(siglip_model, pad="eos", clean="canonicalize")
  assert (tok.pad_id, tok.eos_id) == (1, 1) == (hf.pad_token_id, hf.eos_token_id)
  ids = tok.encode(SIGLIP_TEXTS, 64)
  expected = hf(SIGLIP_TEXTS, padding="max_length", max_length=64, truncation=True)["input_ids"]
  np.testing.assert_array_equal(ids, np.array(expected, np.int32))
  # big_vision's eos="sticky": a cut text still ends in EOS (HF agrees).
  assert ids[-1, -1] == tok.eos_id and (ids[-1] != tok.eos_id).sum() == 63


def test_siglip_clean_and_decode(siglip_model):
  canon = tokenizer.Tokenizer.load(siglip_model, pad="eos", clean="canonicalize")
  texts = ["A Photo, of the CAT!", "two_dogs"]
  assert canon.decode(canon.encode(texts, 64)) == ["a photo of the cat", "twodogs"]
  # HF SiglipTokenizer maps a literal "</s>" in text to EOS; big_vision (plain SentencePiece) encodes the
  # characters, so a caption cannot end early. We follow big_vision.
  np.testing.assert_array_equal(canon.encode("</s> red car", 64), canon.encode("s red car", 64))
  # big_vision lower-cases with tf.strings.lower, ASCII only.
  assert tokenizer.CLEANERS["lower"]("ÉCOLE Red CAR, x") == "École red car, x"
  assert tokenizer.CLEANERS["canonicalize"](" ÉCOLE_Red\tCAR, x! ") == "écolered car x"
  lower = tokenizer.Tokenizer.load(siglip_model, pad="eos", clean="lower")
  plain = tokenizer.Tokenizer.load(siglip_model, pad="eos")
  np.testing.assert_array_equal(lower.encode("A Red CAR, x", 16), plain.encode("a red car, x", 16))
  zero = tokenizer.Tokenizer.load(siglip_model)
  assert zero.pad_id == 0 and zero.encode("a red car", 8)[-1] == 0
  assert zero.decode(zero.encode("a red car", 8)) == plain.decode(plain.encode("a red car", 8)) == "a red car"


def test_option_and_model_checks(siglip_model, tmp_path):
  with pytest.raises(ConfigError, match="pad='one'"):
    tokenizer.Tokenizer.load(siglip_model, pad="one")
  with pytest.raises(ConfigError, match="clean='upper'"):
    tokenizer.Tokenizer.load(siglip_model, clean="upper")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["a red cat", "a blue dog"] * 50), model_writer=model, vocab_size=30,
      pad_id=-1, unk_id=0, eos_id=1, bos_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2)
  (tmp_path / "nopad.model").write_bytes(model.getvalue())
  with pytest.raises(DataError, match="nopad.model.*pad_id=0"):
    tokenizer.Tokenizer.load(tmp_path / "nopad.model")
  tok = tokenizer.Tokenizer.load(tmp_path / "nopad.model", pad="eos")
  assert tok.decode(tok.encode(["a red cat", "a"], 16)) == ["a red cat", "a"]


def test_save_and_load_saved_tokenizer(siglip_model, clip_tok, tmp_path):
  sp_tok = tokenizer.Tokenizer.load(siglip_model, pad="eos", clean="canonicalize")
  sp_tok.save(tmp_path / "sp")
  assert json.loads((tmp_path / "sp" / "tokenizer.json").read_text()) == {
      "kind": "sentencepiece", "file": "tokenizer.model", "pad": "eos", "clean": "canonicalize"}
  loaded = tokenizer.load_saved_tokenizer(tmp_path / "sp")
  assert isinstance(loaded, tokenizer.Tokenizer) and (loaded.pad, loaded.clean) == ("eos", "canonicalize")
  np.testing.assert_array_equal(loaded.encode(SIGLIP_TEXTS, 64), sp_tok.encode(SIGLIP_TEXTS, 64))
  clip_tok.save(tmp_path / "clip")
  assert json.loads((tmp_path / "clip" / "tokenizer.json").read_text()) == {
      "kind": "clip_bpe", "file": "bpe_simple_vocab_16e6.txt.gz"}
  loaded = tokenizer.load_saved_tokenizer(tmp_path / "clip")
  assert isinstance(loaded, ClipBpeTokenizer)
  np.testing.assert_array_equal(loaded.encode(CLIP_TEXTS, 77), clip_tok.encode(CLIP_TEXTS, 77))


@pytest.mark.parametrize("spec, message", [
    (None, "cannot read tokenizer spec"),
    ("{not json", "not valid JSON"),
    ('["sentencepiece"]', "expected"),
    ('{"kind": "wordpiece", "file": "vocab.txt"}', "unknown tokenizer kind 'wordpiece'"),
    ('{"kind": "sentencepiece", "file": "tokenizer.model", "lower": true}', r"unknown options \['lower'\]"),
    ('{"kind": "sentencepiece", "file": "tokenizer.model", "pad": "one"}', "pad='one'"),
    ('{"kind": "sentencepiece", "file": "gone.model"}', "gone.model"),
])
def test_load_saved_tokenizer_errors(siglip_model, tmp_path, spec, message):
  (tmp_path / "tokenizer.model").write_bytes(siglip_model.read_bytes())
  if spec is not None:
    (tmp_path / "tokenizer.json").write_text(spec)
  with pytest.raises(DataError, match=message) as e:
    tokenizer.load_saved_tokenizer(tmp_path)
  assert str(tmp_path) in str(e.value)
