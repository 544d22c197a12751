"""Fuzzed inputs, from a fixed seed: 200 random or damaged image byte strings, 200 random captions
and random token ids, some outside the vocabulary. Each input decodes to a well-formed result, is
skipped and named, or raises an mmjax error naming it; no other exception, no silent wrong result."""
import io
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import mmjax
from mmjax import bundle, models
from mmjax.data import folder, pipeline
from mmjax.data.clip_bpe import ClipBpeTokenizer
from mmjax.data.tokenizer import SHAPES_VLM_MODEL, Tokenizer, default_shapes_tokenizer
from mmjax.errors import BadImageError, DataError
from tests.helpers import random_params

N = 200
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "ICO", "PPM")


def _encoded_images(rng):
  picture = rng.integers(0, 255, (24, 20, 3), np.uint8)
  encoded = {}
  for fmt in FORMATS:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, fmt)
    encoded[fmt] = buffer.getvalue()
  return encoded


def _fuzzed_images():
  """`(N inputs as (kind, format, bytes), each format's intact bytes)`: a quarter each of random
  bytes, truncated images, images with a few bytes overwritten, and image headers before random bytes."""
  rng = np.random.default_rng(0)
  encoded = _encoded_images(rng)
  inputs = []
  for i in range(N):
    fmt = FORMATS[i % len(FORMATS)]
    valid = encoded[fmt]
    kind = ("random", "truncated", "overwritten", "header")[i % 4]
    if kind == "random":
      data = rng.bytes(int(rng.integers(0, 400)))
    elif kind == "truncated":
      data = valid[:int(rng.integers(0, len(valid)))]
    elif kind == "overwritten":
      data = bytearray(valid)
      for _ in range(int(rng.integers(1, 8))):
        data[int(rng.integers(len(data)))] = int(rng.integers(256))
      data = bytes(data)
    else:
      data = valid[:int(rng.integers(1, 40))] + rng.bytes(int(rng.integers(0, 300)))
    inputs.append((kind, fmt, data))
  return inputs, encoded


def _decode_each(inputs, encoded):
  """Decodes every input as the sources do; returns the indices that raised BadImageError."""
  bad = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # PIL warns about corrupt EXIF and TIFF tags it skips.
    for i, (kind, fmt, data) in enumerate(inputs):
      try:
        image = folder.load_image(io.BytesIO(data), f"fuzz{i}.{fmt}")
      except BadImageError as e:
        assert f"fuzz{i}.{fmt}:" in str(e)
        bad.append(i)
        continue
      assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, (i, kind, fmt)
      assert min(image.shape[:2]) >= folder.MIN_SIDE, (i, kind, fmt)
      if kind == "truncated":  # Only a cut in the trailer decodes, and to the whole picture.
        want = np.asarray(Image.open(io.BytesIO(encoded[fmt])).convert("RGB"))
        np.testing.assert_array_equal(image, want, err_msg=f"input {i}: truncated {fmt}")
  return bad


def test_fuzzed_images_decode_or_are_skipped_and_named_or_raise_naming_them(tmp_path):
  inputs, encoded = _fuzzed_images()
  bad = _decode_each(inputs, encoded)
  assert 0 < len(bad) < N
  assert all(i in bad for i, (kind, _, _) in enumerate(inputs) if kind == "random")
  # As files of a caption folder: "raise" names the file, "skip" replaces it and names it once.
  lines = []
  for i, (_, fmt, data) in enumerate(inputs):
    (tmp_path / f"{i:03d}.{fmt.lower()}").write_bytes(data)
    lines.append(json.dumps({"image": f"{i:03d}.{fmt.lower()}", "caption": str(i)}))
  (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
  strict = folder.CaptionFolderSource(tmp_path / "captions.jsonl", on_bad_image="raise")
  for i in bad[:20]:
    with pytest.raises(BadImageError, match=f"{i:03d}"):
      strict[i]
  source = folder.CaptionFolderSource(tmp_path / "captions.jsonl")
  loader = pipeline.Loader(source, tokenizer=None, image_size=16, max_len=0, global_batch_size=8, seed=0,
                           num_epochs=1, drop_remainder=False)
  seen, skipped = [], []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for batch in loader:
      seen += [int(c) for c, valid in zip(batch["caption"], batch[pipeline.VALID]) if valid]
      skipped += batch[pipeline.SKIPPED].tolist()
  assert sorted(seen) == sorted(set(range(N)) - set(bad))
  assert sorted(path for path, _ in skipped) == [str(tmp_path / f"{i:03d}.{inputs[i][1].lower()}") for i in bad]
  assert all(reason.startswith(path) for path, reason in skipped)


def _fuzzed_captions():
  """N captions: empty, blank, 10k characters, special-token look-alikes, and random code points
  from ASCII, Latin, CJK, emoji, combining marks, right-to-left scripts, controls and the top of
  Unicode; 1 in 10 holds a lone surrogate (as a JSON "\\ud800" escape makes)."""
  rng = np.random.default_rng(1)
  ranges = [(0x20, 0x7f), (0xa0, 0x250), (0x4e00, 0x9fff), (0x1f300, 0x1faff), (0x300, 0x36f),
            (0x590, 0x6ff), (0x0, 0x20), (0xe000, 0xf8ff), (0xfff0, 0x10000), (0x10fff0, 0x110000)]
  long = [("".join(map(chr, rng.integers(low, high, 10_000)))) for low, high in ranges[:4]]
  fixed = ["", " ", "\n\t ", "a" * 10_000, " ".join(["word"] * 2_000), *long, "</s>", "<unk>", "<pad>",
           "<start_of_text>x<end_of_text>", "&amp;&lt;b&gt;", "\x00", "\ufeff", "e\u0301"]
  texts = list(fixed)
  while len(texts) < N:
    size = int(rng.choice([1, 5, 30, 300]))
    low, high = ranges[int(rng.integers(len(ranges)))]
    points = rng.integers(low, high, size)
    if len(texts) % 10 == 0:
      points[int(rng.integers(size))] = int(rng.integers(0xd800, 0xe000))
    texts.append("".join(map(chr, points)))
  return texts


def _tokenizers():
  shapes = default_shapes_tokenizer()
  vlm = Tokenizer.load(SHAPES_VLM_MODEL)
  return {"shapes": shapes, "shapes_vlm": vlm,
          "sentencepiece_eos_canonicalize": Tokenizer(shapes.model_proto, pad="eos", clean="canonicalize"),
          "clip_bpe": ClipBpeTokenizer.from_open_clip()}


def _end(tok, row) -> int:
  """The position of the EOS that ends the row's text: the last EOS (CLIP encodes a literal
  "<end_of_text>" in a text as that token, as open_clip does), or the first where EOS pads."""
  ends = np.flatnonzero(row == tok.eos_id)
  return int(ends[0] if tok.pad_id == tok.eos_id else ends[-1])


@pytest.mark.parametrize("name", ["shapes", "shapes_vlm", "sentencepiece_eos_canonicalize", "clip_bpe"])
def test_fuzzed_captions_encode_to_well_formed_rows_or_raise_a_data_error_naming_them(name):
  tok = _tokenizers()[name]
  texts = _fuzzed_captions()
  good = []
  for text in texts:
    lone = any(0xd800 <= ord(c) < 0xe000 for c in text)
    if lone:
      with pytest.raises(DataError, match="not valid Unicode") as e:
        tok.encode(text, 16)
      assert repr(text)[:40] in str(e.value)
      continue
    good.append(text)
    short, long = tok.encode(text, 16), tok.encode(text, 64)
    for row in (short, long):
      assert row.dtype == np.int32 and ((0 <= row) & (row < tok.vocab_size)).all(), repr(text[:40])
      assert (row[_end(tok, row) + 1:] == tok.pad_id).all(), repr(text[:40])  # EOS, then padding only.
    # A longer row only cuts the text later: the short row's ids are the long row's first ones.
    end = _end(tok, short)
    np.testing.assert_array_equal(short[:end], long[:end], err_msg=repr(text[:40]))
  assert len(good) > N * 0.8
  np.testing.assert_array_equal(tok.encode(good, 16), np.stack([tok.encode(t, 16) for t in good]))


def _export(tmp_path, model_config, example, tokenizer):
  """`mmjax.load` of an export of the model with random parameters, initialised on `example` inputs."""
  params = random_params(models.build(model_config), *example)
  out = str(tmp_path / model_config.get("kind", "two_tower"))
  bundle.write(out, model_config, params, tokenizer, {"test": "random init"})
  return mmjax.load(out)


def _fuzzed_ids(vocab_size, shape):
  """N int32 id arrays: 1 in 20 all in range, the rest with 1..4 ids out of range (just past the
  vocabulary, negative, or int32's extremes)."""
  rng = np.random.default_rng(2)
  out = []
  for i in range(N):
    ids = rng.integers(0, vocab_size, shape).astype(np.int32)
    if i % 20:
      for _ in range(int(rng.integers(1, 5))):
        where = tuple(int(rng.integers(n)) for n in shape)
        ids[where] = rng.choice([vocab_size, vocab_size + int(rng.integers(1000)), -1,
                                 -int(rng.integers(1, vocab_size)), np.iinfo(np.int32).max, np.iinfo(np.int32).min])
    out.append(ids)
  return out


def _check_ids_reach_the_model(apply, ids_list, vocab_size, path):
  for ids in ids_list:
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if not len(bad):
      assert np.isfinite(np.asarray(apply(ids))).all()
      continue
    with pytest.raises(DataError) as e:
      apply(ids)
    first = tuple(bad[0].tolist())
    message = str(e.value)
    assert message.startswith(f"{path}: token id {ids[first]} at {first} ") and f"[0, {vocab_size})" in message


def test_out_of_vocabulary_ids_raise_a_data_error_in_loaded_models(tmp_path):
  tiny = dict(width=32, depth=1, mlp_dim=64, num_heads=2)
  tok = default_shapes_tokenizer()
  two_tower = dict(image=dict(tiny, patch_size=8, pool="map"), text=dict(tiny, vocab_size=tok.vocab_size, max_len=8),
                   embed_dim=16)
  example = (np.zeros((1, 16, 16, 3), np.float32), np.zeros((1, 8), np.int32))
  model, params, _ = _export(tmp_path, two_tower, example, tok)
  embed_text = lambda ids: model.apply({"params": params}, text=ids)[1]
  _check_ids_reach_the_model(embed_text, _fuzzed_ids(tok.vocab_size, (2, 8)), tok.vocab_size, "txt/Embed_0")
  vlm = Tokenizer.load(SHAPES_VLM_MODEL)
  lm = dict(kind="lm", vocab_size=vlm.vocab_size, max_len=16, **tiny)
  model, params, _ = _export(tmp_path, lm, (np.zeros((1, 8), np.int32),), vlm)
  logits = lambda ids: model.apply({"params": params}, ids)[0]
  _check_ids_reach_the_model(logits, _fuzzed_ids(vlm.vocab_size, (2, 8)), vlm.vocab_size, "embedder")
  # Under jit the ids are tracers and go unchecked: an id past the vocabulary reads NaNs (so a
  # training loss turns NaN and the trainer stops), a negative one in range a row from the end.
  jitted = jax.jit(logits)
  ids = np.array([[1, vlm.vocab_size]], np.int32)
  assert np.isnan(np.asarray(jitted(ids))[0, 1]).all()
  np.testing.assert_array_equal(np.asarray(jitted(np.array([[-1]], np.int32))),
                                np.asarray(jitted(np.array([[vlm.vocab_size - 1]], np.int32))))
  with pytest.raises(DataError, match="token ids must be integers, got dtype float32"):
    logits(jnp.zeros((1, 2), jnp.float32))
