"""Decoder-only LM: HF parity (GPT-2, Llama with GQA, Gemma), KV-cache decoding, greedy and beam generation.

The reference models are tiny random-weight HF models in float32 on CPU; logits must agree to
1e-5 relative error and generated token ids exactly (HF's `generate`, left-padded prompts).
"""
import flax
import jax
import numpy as np
import pytest

from mmjax.errors import ConfigError, ConversionError
from mmjax.generate import generate
from mmjax.models.decoder import build_decoder, decoder_config

RTOL = 1e-5
VOCAB, PAD = 97, 1
HF_CONFIGS = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=32)),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, intermediate_size=64, rope_theta=500.0)),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=1, head_dim=16, intermediate_size=64)),
}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def prompts(batch=3, length=6, seed=0):
  """Left-padded token ids and their mask: row i has `2 * i` padding tokens."""
  tokens = np.random.default_rng(seed).integers(3, VOCAB, size=(batch, length))
  mask = np.arange(length)[None, :] >= 2 * np.arange(batch)[:, None]
  return np.where(mask, tokens, PAD), mask


def random_params(model, tokens, seed=0, scale=0.3):
  """Random parameters without `model.init`, whose random-normal initialisers take XLA:CPU seconds to compile."""
  shapes = flax.linen.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.normal(size=s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def hf_models():
  """name -> (HF model, mmjax config, params); weights perturbed so every parameter matters and
  logits spread out (greedy choices are not near ties)."""
  torch = pytest.importorskip("torch", reason="HF parity tests need torch: pip install -e '.[interop]'")
  transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[interop]'")
  from mmjax.interop.hf_lm import from_hf_lm
  out = {}
  for name, (model_cls, config_cls, kw) in HF_CONFIGS.items():
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, bos_token_id=0, eos_token_id=2, pad_token_id=PAD,
                                               **kw)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
      for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.3)
    out[name] = (model, *from_hf_lm(model))
  return out


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_logits_parity(hf_models, name):
  import torch
  model, cfg, params = hf_models[name]
  tokens, mask = prompts(length=10)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    ref = model(torch.from_numpy(tokens)).logits.numpy()
    ref_padded = model(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                       position_ids=torch.from_numpy(positions)).logits.numpy()
  apply = jax.jit(build_decoder(cfg).apply)
  ours, aux = apply({"params": params}, tokens)
  assert rel_err(ours, ref) <= RTOL, f"{name}: relative error {rel_err(ours, ref):.2e}"
  assert aux["hidden"].shape == (3, 10, cfg["width"])
  ours_padded, _ = apply({"params": params}, tokens, mask=mask)
  err = rel_err(np.asarray(ours_padded)[mask], ref_padded[mask])
  assert err <= RTOL, f"{name} with padding: relative error {err:.2e}"


@pytest.mark.parametrize("kw", [
    dict(num_heads=4, num_kv_heads=2, positions="rope", norm="rmsnorm", mlp="gated", act="silu"),
    dict(num_heads=4, positions="learn", norm="layernorm", mlp="mlp", act="gelu_tanh", attention_bias=True,
         mlp_bias=True, tie_embeddings=True, max_len=16),
], ids=["rope_gqa_gated", "learned_layernorm_tied"])
def test_cache_decoding_matches_full_forward(kw):
  model = build_decoder(dict(vocab_size=VOCAB, width=32, depth=2, mlp_dim=64, **kw))
  apply = jax.jit(model.apply)
  tokens, mask = prompts(length=10, seed=1)
  tokens[1, 2:] = tokens[0, :8]  # Row 1: row 0's first 8 tokens behind 2 padding tokens.
  params = {"params": random_params(model, tokens)}
  full, _ = apply(params, tokens, mask=mask)
  full = np.asarray(full)
  # Left padding changes nothing: positions count real tokens and padding is never attended to.
  assert rel_err(full[1, 2:], full[0, :8]) <= RTOL
  # Prefill 6 tokens in one call, then decode the remaining 4 one at a time.
  logits, aux = apply(params, tokens[:, :6], mask=mask[:, :6], cache=model.init_cache(3, 12))
  chunks = [logits]
  for i in range(6, 10):
    logits, aux = apply(params, tokens[:, i:i + 1], cache=aux["cache"])
    chunks.append(logits)
  assert rel_err(np.concatenate(chunks, axis=1)[mask], full[mask]) <= RTOL
  cache = aux["cache"]
  assert int(cache["index"]) == 10 and cache["pos"].tolist() == mask.sum(axis=1).tolist()


def hf_generate(model, tokens, mask, max_new_tokens, stop, **kw):
  import torch
  with torch.no_grad():
    out = model.generate(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=PAD,
                         return_dict_in_generate=True, output_scores=True, **kw)
  # HF stops when every row is done; pad to the full length as mmjax returns it.
  new = out.sequences[:, tokens.shape[1]:].numpy()
  return np.pad(new, ((0, 0), (0, max_new_tokens - new.shape[1])), constant_values=PAD), out


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_matches_hf_and_stops(hf_models, name):
  model, cfg, params = hf_models[name]
  decoder = build_decoder(cfg)
  tokens, mask = prompts()
  n = 8
  # First without a reachable stop token (id VOCAB never comes out), then stopping at a token row 0 emits.
  free, _ = generate(decoder, params, tokens, mask, max_new_tokens=n, stop_tokens=(VOCAB,), pad_id=PAD)
  stop = int(free[0, 3])
  first = int(np.argmax(np.asarray(free[0]) == stop))
  ours, scores = generate(decoder, params, tokens, mask.sum(axis=1), max_new_tokens=n, stop_tokens=(stop,),
                          pad_id=PAD)
  ours = np.asarray(ours)
  ref, _ = hf_generate(model, tokens, mask, n, stop)
  np.testing.assert_array_equal(ours, ref)
  np.testing.assert_array_equal(ours[0, :first + 1], np.asarray(free[0, :first + 1]))
  assert (ours[0, first + 1:] == PAD).all() and ours[0, first] == stop
  assert np.all(np.asarray(scores) < 0)


def test_beam_search_matches_hf(hf_models):
  model, cfg, params = hf_models["llama"]
  decoder = build_decoder(cfg)
  tokens, mask = prompts()
  n = 8
  free, _ = generate(decoder, params, tokens, mask, max_new_tokens=n, stop_tokens=(VOCAB,), pad_id=PAD)
  stop = int(free[0, 3])
  finished_early = 0
  for length_penalty in (1.0, 0.5):
    ours, scores = generate(decoder, params, tokens, mask, max_new_tokens=n, stop_tokens=(stop,), pad_id=PAD,
                            method="beam", num_beams=3, length_penalty=length_penalty)
    ref, out = hf_generate(model, tokens, mask, n, stop, num_beams=3, length_penalty=length_penalty)
    np.testing.assert_array_equal(np.asarray(ours), ref)
    np.testing.assert_allclose(np.asarray(scores), out.sequences_scores.numpy(), rtol=RTOL)
    finished_early += int((np.asarray(ours) == stop).any(axis=1).sum())
  assert finished_early, "the stop token should end some hypotheses, or the test checks little"


def test_generate_from_embeddings(hf_models):
  """The embedding entry point, where LLaVA splices in image features, generates like the tokens."""
  _, cfg, params = hf_models["llama"]
  decoder = build_decoder(cfg)
  tokens, mask = prompts()
  embeds = decoder.apply({"params": params}, tokens, method=decoder.embed)
  ours, _ = generate(decoder, params, tokens, mask, max_new_tokens=8, stop_tokens=(VOCAB,), pad_id=PAD)
  from_embeds, _ = generate(decoder, params, None, mask.sum(axis=1), max_new_tokens=8, stop_tokens=(VOCAB,),
                            pad_id=PAD, inputs_embeds=embeds)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(from_embeds))


def test_config_errors_name_the_key():
  with pytest.raises(ConfigError, match="num_layers"):
    decoder_config(num_layers=2)
  with pytest.raises(ConfigError, match="ropetheta"):
    build_decoder({"width": 32, "ropetheta": 1e4})
  with pytest.raises(ConfigError, match="norm='batchnorm'"):
    build_decoder({"norm": "batchnorm"})
  with pytest.raises(ConfigError, match="num_kv_heads 3"):
    build_decoder({"num_heads": 4, "num_kv_heads": 3})
  model = build_decoder({"positions": "learn", "max_len": 8})
  with pytest.raises(ConfigError, match="max_len=8"):
    model.init_cache(1, 9)
  tokens, mask = prompts()
  with pytest.raises(ConfigError, match=r"rows \[1, 2\] are not left-padded"):
    generate(model, {}, tokens, mask[:, ::-1], max_new_tokens=2)
  with pytest.raises(ConfigError, match="method='sample'"):
    generate(model, {}, tokens, mask, max_new_tokens=2, method="sample")


def test_unsupported_hf_configs_name_the_key():
  pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[interop]'")
  from mmjax.interop.hf_lm import from_hf_lm
  llama = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
               intermediate_size=64)
  with pytest.raises(ConversionError, match="rope_type='linear'"):
    from_hf_lm({}, {**llama, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
  with pytest.raises(ConversionError, match="hidden_act='tanh'"):
    from_hf_lm({}, {**llama, "hidden_act": "tanh"})
  gpt2 = dict(model_type="gpt2", vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=16)
  with pytest.raises(ConversionError, match="scale_attn_by_inverse_layer_idx=True"):
    from_hf_lm({}, {**gpt2, "scale_attn_by_inverse_layer_idx": True})
  with pytest.raises(ConversionError, match="model_type='bert'"):
    from_hf_lm({}, {"model_type": "bert"})
  with pytest.raises(ConversionError, match=r"missing 1: transformer.ln_f.weight"):
    state = {"transformer.wte.weight": np.zeros((VOCAB, 32)), "transformer.wpe.weight": np.zeros((16, 32)),
             "transformer.ln_f.bias": np.zeros(32)}
    state.update({f"transformer.h.0.{k}": np.zeros(s) for k, s in (
        ("ln_1.weight", 32), ("ln_1.bias", 32), ("attn.c_attn.weight", (32, 96)), ("attn.c_attn.bias", 96),
        ("attn.c_proj.weight", (32, 32)), ("attn.c_proj.bias", 32), ("ln_2.weight", 32), ("ln_2.bias", 32),
        ("mlp.c_fc.weight", (32, 128)), ("mlp.c_fc.bias", 128), ("mlp.c_proj.weight", (128, 32)),
        ("mlp.c_proj.bias", 32))})
    from_hf_lm(state, gpt2)


def test_remat_recomputes_blocks_with_the_same_gradients():
  """`remat_policy` rematerialises each block in training: same loss and gradients, and the
  backward recomputes (the step's jaxpr holds a remat); decoding with a cache does not."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50, (2, 12))
  mask = np.ones((2, 12), bool)
  mask[0, :3] = False  # Left padding, as the training batches have.
  results = {}
  for policy in ("none", "full"):
    model = build_decoder(dict(vocab_size=50, width=32, depth=2, num_heads=2, mlp_dim=64, remat_policy=policy))
    params = model.init(jax.random.PRNGKey(0), tokens, mask=mask)
    loss = lambda p: model.apply(p, tokens, mask=mask, train=True)[0][mask].sum()
    results[policy] = jax.value_and_grad(loss)(params)
    assert ("remat" in str(jax.make_jaxpr(loss)(params))) == (policy == "full")
  (want, want_grads), (got, got_grads) = results["none"], results["full"]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  with pytest.raises(ConfigError, match="remat_policy"):
    build_decoder(dict(remat_policy="some"))
