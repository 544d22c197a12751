"""Converters against the real reference models: open_clip and HF transformers on CPU torch.

Random weights, same images and token ids on both sides; embeddings and logits must agree
to 1e-5 relative error in float32.
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop parity tests need torch: pip install -e '.[interop]'")
open_clip = pytest.importorskip("open_clip", reason="needs open_clip_torch: pip install -e '.[interop]'")
transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[interop]'")

import mmjax  # noqa: E402
from mmjax import convert_checkpoint, models  # noqa: E402
from mmjax.errors import ConversionError  # noqa: E402
from mmjax.interop import from_big_vision, from_hf, from_open_clip, to_hf  # noqa: E402
from tests.helpers import run_notebook  # noqa: E402

RTOL = 1e-5
TINY_OC_TEXT = dict(context_length=16, vocab_size=100, width=32, heads=4, layers=2)
TINY_OC_VISION = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def inputs(size, vocab, length, eos, batch=3, seed=0):
  """NHWC images and token ids with one end-of-text token per row, at different positions."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  text = rng.integers(1, vocab - 2, size=(batch, length))
  for i in range(batch):
    text[i, 3 + 2 * i] = eos
  return images, text


def mmjax_outputs(model_config, params, images, text):
  images = images["mmjax"] if isinstance(images, dict) else images
  zimg, ztxt, aux = models.build(model_config).apply({"params": params}, image=images, text=text)
  logits = aux["t"] * np.asarray(zimg) @ np.asarray(ztxt).T + aux.get("b", 0.0)
  return np.asarray(zimg), np.asarray(ztxt), logits


def assert_parity(ours, reference):
  for name, a, b in zip(("image embeddings", "text embeddings", "logits"), ours, reference):
    assert rel_err(a, b) <= RTOL, f"{name}: relative error {rel_err(a, b):.2e}"


def perturb(model, scale=0.02, seed=0):
  """HF zero-initialises biases and norms; random values make every parameter count."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * scale)
  return model.eval()


# open_clip ----------------------------------------------------------------------------------


def open_clip_outputs(model, images, text):
  with torch.no_grad():
    zimg = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)), normalize=True)
    ztxt = model.encode_text(torch.from_numpy(text), normalize=True)
    logits = model.logit_scale.exp() * zimg @ ztxt.T
    if model.logit_bias is not None:
      logits = logits + model.logit_bias
  return zimg.numpy(), ztxt.numpy(), logits.numpy()


def test_open_clip_vit_b32_full_size():
  torch.manual_seed(0)
  model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
  model_config, params = from_open_clip(model)
  assert model_config["image"]["act"] == "gelu" and model_config["text"]["pool"] == "argmax"
  images, text = inputs(224, 49408, 77, eos=49407, batch=2)
  assert_parity(mmjax_outputs(model_config, params, images, text), open_clip_outputs(model, images, text))


@pytest.mark.parametrize("extra", [
    dict(quick_gelu=True),
    dict(init_logit_bias=-10.0, text_cfg=dict(pool_type="last", no_causal_mask=True, proj_bias=True)),
    dict(vision_cfg=dict(no_ln_pre=True, act_kwargs=dict(approximate="tanh")),
         text_cfg=dict(pool_type="eos", eos_id=97, act_kwargs=dict(approximate="tanh"))),
], ids=["quick_gelu", "siglip_style", "eos_pool_tanh_no_ln_pre"])
def test_open_clip_custom_configs_from_state_dict_and_json(extra):
  cfg = dict(embed_dim=24, quick_gelu=extra.get("quick_gelu", False),
             vision_cfg={**TINY_OC_VISION, **extra.get("vision_cfg", {})},
             text_cfg={**TINY_OC_TEXT, **extra.get("text_cfg", {})})
  if "init_logit_bias" in extra:
    cfg["init_logit_bias"] = extra["init_logit_bias"]
  torch.manual_seed(1)
  model = open_clip.CLIP(**cfg).eval()
  images, text = inputs(32, 100, 16, eos=97 if "eos_id" in cfg["text_cfg"] else 99)
  reference = open_clip_outputs(model, images, text)
  # From the model object (config read off the modules) and from state dict + JSON config.
  for converted in (from_open_clip(model), from_open_clip(model.state_dict(), json.loads(json.dumps(cfg)))):
    assert_parity(mmjax_outputs(*converted, images, text), reference)


def test_open_clip_refuses_what_it_cannot_convert():
  cfg = dict(embed_dim=24, vision_cfg={**TINY_OC_VISION, "ls_init_value": 0.1}, text_cfg=TINY_OC_TEXT)
  with pytest.raises(ConversionError, match=r"vision_cfg.ls_init_value=0.1"):
    from_open_clip({}, cfg)
  with pytest.raises(ConversionError, match="needs model_config"):
    from_open_clip({})


def test_mismatched_state_dicts_name_the_parameters():
  cfg = dict(embed_dim=24, vision_cfg=TINY_OC_VISION, text_cfg=TINY_OC_TEXT)
  state = {k: v.clone() for k, v in open_clip.CLIP(**cfg).state_dict().items()}
  missing = dict(state)
  del missing["visual.ln_post.weight"]
  with pytest.raises(ConversionError, match=r"missing 1: visual.ln_post.weight"):
    from_open_clip(missing, cfg)
  extra = {**state, "visual.extra.weight": torch.zeros(3, 2)}
  with pytest.raises(ConversionError, match=r"unexpected 1: visual.extra.weight \(3, 2\)"):
    from_open_clip(extra, cfg)
  wrong = {**state, "token_embedding.weight": torch.zeros(101, 32)}
  with pytest.raises(ConversionError, match=r"wrong shape: txt/Embed_0/embedding \(101, 32\) \(model: \(100, 32\)\)"):
    from_open_clip(wrong, cfg)


# HF transformers ----------------------------------------------------------------------------

HF_TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=16, eos_token_id=99, bos_token_id=98, pad_token_id=0)
HF_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8)


def hf_model(kind, **text):
  if kind == "clip":
    config = transformers.CLIPConfig(text_config={**HF_TEXT, **text}, vision_config=HF_VISION, projection_dim=24)
    return perturb(transformers.CLIPModel(config))
  config = transformers.SiglipConfig(text_config={**HF_TEXT, **text}, vision_config=HF_VISION)
  return perturb(transformers.SiglipModel(config))


def hf_image_inputs(images):
  """HF's image arguments: NHWC images, or SigLIP 2's processor output (`siglip2_images`)."""
  if isinstance(images, dict):
    return {k: torch.from_numpy(v) for k, v in images.items() if k != "mmjax"}
  return dict(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))


def hf_outputs(model, images, text):
  with torch.no_grad():
    zimg = model.get_image_features(**hf_image_inputs(images))
    ztxt = model.get_text_features(input_ids=torch.from_numpy(text))
    zimg, ztxt = (getattr(z, "pooler_output", z) for z in (zimg, ztxt))
    zimg, ztxt = (torch.nn.functional.normalize(z, dim=-1) for z in (zimg, ztxt))
    logits = model.logit_scale.exp() * zimg @ ztxt.T
    if getattr(model, "logit_bias", None) is not None:
      logits = logits + model.logit_bias
  return zimg.numpy(), ztxt.numpy(), logits.numpy()


@pytest.mark.parametrize("kind,text", [("clip", {}), ("clip", {"eos_token_id": 2}), ("siglip", {})],
                         ids=["clip", "clip_legacy_eos_argmax", "siglip"])
def test_hf_parity_and_round_trip(kind, text):
  model = hf_model(kind, **text)
  eos = model.config.text_config.eos_token_id
  images, txt = inputs(32, 100, 16, eos=99 if eos == 2 else eos)
  reference = hf_outputs(model, images, txt)
  model_config, params = from_hf(model)
  assert_parity(mmjax_outputs(model_config, params, images, txt), reference)
  # Also from a state dict with the config as saved in config.json.
  assert_parity(mmjax_outputs(*from_hf(model.state_dict(), model.config.to_dict()), images, txt), reference)
  back = to_hf(model_config, params)
  assert type(back) is type(model)
  assert_parity(hf_outputs(back, images, txt), reference)


def test_to_hf_folds_a_clip_patch_bias_into_the_positions():
  model_config, params = from_hf(hf_model("clip"))
  params["img"]["embedding"]["bias"] = np.random.default_rng(0).normal(size=32).astype(np.float32)
  images, txt = inputs(32, 100, 16, eos=99)
  assert_parity(hf_outputs(to_hf(model_config, params), images, txt), mmjax_outputs(model_config, params, images, txt))


def test_to_hf_refuses_architectures_hf_lacks():
  model_config, params = from_hf(hf_model("siglip"))
  model_config["image"]["pool"] = "gap"
  with pytest.raises(ConversionError, match=r"image.pool='gap' \(needs 'map'\)"):
    to_hf(model_config, params)


# SigLIP 2 (NaFlex) ------------------------------------------------------------------------------

HF_NAFLEX_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_patches=16, patch_size=8)


def hf_siglip2(**text):
  config = transformers.Siglip2Config(text_config={**HF_TEXT, **text}, vision_config=HF_NAFLEX_VISION)
  return perturb(transformers.Siglip2Model(config))


def siglip2_images(budget, seed=0):
  """A wide, a tall and a square image cut by HF's Siglip2ImageProcessor into `budget` patches each;
  under "mmjax" the same patches as mmjax's NaFlex tower takes them."""
  from PIL import Image
  processing = pytest.importorskip("transformers.models.siglip2.image_processing_siglip2")
  rng = np.random.default_rng(seed)
  images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((24, 56), (64, 20), (32, 32))]
  hf = dict(processing.Siglip2ImageProcessor(patch_size=8, max_num_patches=budget)(images=images, return_tensors="np"))
  (wide_h, wide_w), (tall_h, tall_w) = hf["spatial_shapes"][:2]
  assert wide_h < wide_w and tall_h > tall_w
  return {**hf, "mmjax": dict(patches=hf["pixel_values"], grid=hf["spatial_shapes"])}


@pytest.mark.parametrize("budget", [16, 40])
def test_hf_siglip2_parity_and_round_trip(budget):
  model = hf_siglip2()
  images, (_, txt) = siglip2_images(budget), inputs(32, 100, 16, eos=99)
  reference = hf_outputs(model, images, txt)
  model_config, params = from_hf(model, max_patches=budget)
  assert model_config["image"]["naflex"] and model_config["image"]["posemb_grid"] == 4
  assert model_config["max_patches"] == budget
  assert_parity(mmjax_outputs(model_config, params, images, txt), reference)
  back = to_hf(model_config, params)
  assert type(back) is type(model)
  assert_parity(hf_outputs(back, images, txt), reference)


def test_convert_cli_hf_siglip2_records_the_patch_budget(tmp_path):
  """The export prepares images as the HF processor does at the budget given on the command line."""
  model = hf_siglip2(vocab_size=160, eos_token_id=2)
  model.save_pretrained(tmp_path / "hf")
  from mmjax.data.tokenizer import SHAPES_MODEL
  convert_checkpoint.main(["--from", "hf", "--source", str(tmp_path / "hf"), "--tokenizer", str(SHAPES_MODEL),
                           "--max-patches", "40", "--out", str(tmp_path / "export")])
  loaded = mmjax.load(str(tmp_path / "export"))
  assert loaded.model_config["max_patches"] == 40
  images = siglip2_images(40)
  assert loaded.preprocess(np.zeros((30, 90, 3), np.uint8))["patches"].shape == (1, 40, 8 * 8 * 3)
  text = ["a red circle", "a blue star", "two green crosses"]
  reference = hf_outputs(model, images, loaded.tokenizer.encode(text, 16))
  assert rel_err(loaded.encode_image(images["mmjax"]), reference[0]) <= RTOL
  assert rel_err(loaded.encode_text(text), reference[1]) <= RTOL


# big_vision ---------------------------------------------------------------------------------


def big_vision_npz(model, path, scan=False):
  """A SigLIP .npz in big_vision's names and layouts, written from a HF SiglipModel (a Siglip2Model:
  big_vision's NaFlex ViT, whose `embedding` is a Dense over flattened patches and whose positions
  are a [G, G, width] grid).

  The mapping is big_vision's two_towers naming, spelt out here independently of the
  converter under test.
  """
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  cfg = model.config
  out = {}

  def attn(dst, src, heads, fused=False):
    if fused:
      ws, bs = np.split(sd[f"{src}.in_proj_weight"], 3), np.split(sd[f"{src}.in_proj_bias"], 3)
    else:
      ws = [sd[f"{src}.{n}_proj.weight"] for n in "qkv"]
      bs = [sd[f"{src}.{n}_proj.bias"] for n in "qkv"]
    for name, w, b in zip(("query", "key", "value"), ws, bs):
      out[f"{dst}/{name}/kernel"] = w.T.reshape(w.shape[1], heads, -1)
      out[f"{dst}/{name}/bias"] = b.reshape(heads, -1)
    w = sd[f"{src}.out_proj.weight"]
    out[f"{dst}/out/kernel"] = w.T.reshape(heads, -1, w.shape[0])
    out[f"{dst}/out/bias"] = sd[f"{src}.out_proj.bias"]

  def ln(dst, src):
    out[f"{dst}/scale"], out[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

  def linear(dst, src):
    out[f"{dst}/kernel"], out[f"{dst}/bias"] = sd[f"{src}.weight"].T, sd[f"{src}.bias"]

  def encoder(dst, src, layers, heads):
    for i in range(layers):
      b, s = f"{dst}/encoderblock_{i}", f"{src}.{i}"
      ln(f"{b}/LayerNorm_0", f"{s}.layer_norm1")
      attn(f"{b}/MultiHeadDotProductAttention_0", f"{s}.self_attn", heads)
      ln(f"{b}/LayerNorm_1", f"{s}.layer_norm2")
      linear(f"{b}/MlpBlock_0/Dense_0", f"{s}.mlp.fc1")
      linear(f"{b}/MlpBlock_0/Dense_1", f"{s}.mlp.fc2")

  v, t = cfg.vision_config, cfg.text_config
  patch_kernel = sd["vision_model.embeddings.patch_embedding.weight"]
  positions = sd["vision_model.embeddings.position_embedding.weight"]
  if isinstance(model, transformers.Siglip2Model):
    out["img/embedding/kernel"] = patch_kernel.T
    grid = int(np.sqrt(positions.shape[0]))
    out["img/pos_embedding"] = positions.reshape(grid, grid, -1)
  else:
    out["img/embedding/kernel"] = patch_kernel.transpose(2, 3, 1, 0)
    out["img/pos_embedding"] = positions[None]
  out["img/embedding/bias"] = sd["vision_model.embeddings.patch_embedding.bias"]
  encoder("img/Transformer", "vision_model.encoder.layers", v.num_hidden_layers, v.num_attention_heads)
  ln("img/Transformer/encoder_norm", "vision_model.post_layernorm")
  out["img/MAPHead_0/probe"] = sd["vision_model.head.probe"]
  attn("img/MAPHead_0/MultiHeadDotProductAttention_0", "vision_model.head.attention", v.num_attention_heads, True)
  ln("img/MAPHead_0/LayerNorm_0", "vision_model.head.layernorm")
  linear("img/MAPHead_0/MlpBlock_0/Dense_0", "vision_model.head.mlp.fc1")
  linear("img/MAPHead_0/MlpBlock_0/Dense_1", "vision_model.head.mlp.fc2")
  out["txt/Embed_0/embedding"] = sd["text_model.embeddings.token_embedding.weight"]
  out["txt/pos_embedding"] = sd["text_model.embeddings.position_embedding.weight"][None]
  encoder("txt/Encoder_0", "text_model.encoder.layers", t.num_hidden_layers, t.num_attention_heads)
  ln("txt/Encoder_0/encoder_norm", "text_model.final_layer_norm")
  linear("txt/head", "text_model.head")
  out["t"], out["b"] = sd["logit_scale"].reshape(1), sd["logit_bias"].reshape(1)
  if scan:  # big_vision's scanned layout: one `encoderblock` with a leading layer axis.
    for prefix, layers in (("img/Transformer", v.num_hidden_layers), ("txt/Encoder_0", t.num_hidden_layers)):
      names = {k.split("/", 3)[3] for k in out if k.startswith(f"{prefix}/encoderblock_")}
      for name in names:
        out[f"{prefix}/encoderblock/{name}"] = np.stack(
            [out.pop(f"{prefix}/encoderblock_{i}/{name}") for i in range(layers)])
  np.savez(path, **{f"params/{k}": a for k, a in out.items()})
  return path


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_big_vision_npz_matches_hf_siglip(tmp_path, scan):
  model = hf_model("siglip")
  images, txt = inputs(32, 100, 16, eos=99)
  model_config, params = from_big_vision(big_vision_npz(model, tmp_path / "siglip.npz", scan))
  assert model_config["image"]["scan"] is scan and model_config["image"]["pool"] == "map"
  assert_parity(mmjax_outputs(model_config, params, images, txt), hf_outputs(model, images, txt))


def test_big_vision_naflex_npz_matches_hf_siglip2(tmp_path):
  from mmjax.data.tokenizer import SHAPES_MODEL
  model = hf_siglip2(vocab_size=160)
  images, (_, txt) = siglip2_images(24), inputs(32, 160, 16, eos=99)
  npz = big_vision_npz(model, tmp_path / "siglip2.npz", scan=True)
  model_config, params = from_big_vision(npz, max_patches=24)
  assert model_config["image"]["naflex"] and model_config["image"]["posemb_grid"] == 4
  assert model_config["image"]["patch_size"] == 8 and model_config["max_patches"] == 24
  reference = hf_outputs(model, images, txt)
  assert_parity(mmjax_outputs(model_config, params, images, txt), reference)
  convert_checkpoint.main(["--from", "big_vision", "--source", str(npz), "--tokenizer", str(SHAPES_MODEL),
                           "--max-patches", "24", "--out", str(tmp_path / "export")])
  loaded = mmjax.load(str(tmp_path / "export"))
  assert rel_err(loaded.encode_image(images["mmjax"]), reference[0]) <= RTOL


def test_big_vision_missing_parameter_is_named(tmp_path):
  path = big_vision_npz(hf_model("siglip"), tmp_path / "siglip.npz")
  arrays = dict(np.load(path))
  del arrays["params/img/MAPHead_0/probe"]
  np.savez(tmp_path / "broken.npz", **arrays)
  with pytest.raises(ConversionError, match=r"missing 1: img/MAPHead_0/probe \(1, 1, 32\)"):
    from_big_vision(tmp_path / "broken.npz")


# The command line -----------------------------------------------------------------------------


def test_convert_cli_open_clip_and_hf_to_exports(tmp_path, capsys):
  cfg = dict(embed_dim=24, quick_gelu=True, vision_cfg=TINY_OC_VISION,
             text_cfg={**TINY_OC_TEXT, "vocab_size": 49408})
  torch.manual_seed(2)
  oc = open_clip.CLIP(**cfg).eval()
  torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in oc.state_dict().items()}},
             tmp_path / "oc.pt")
  (tmp_path / "oc.json").write_text(json.dumps(cfg))
  convert_checkpoint.main(["--from", "open_clip", "--source", str(tmp_path / "oc.pt"), "--model-config",
                str(tmp_path / "oc.json"), "--out", str(tmp_path / "oc_export")])
  assert "exported to" in capsys.readouterr().out
  model, params, tokenizer = mmjax.load(str(tmp_path / "oc_export"))
  text = tokenizer.encode(["a photo of a dog", "a red circle"], 16)
  images, _ = inputs(32, 100, 16, eos=99, batch=2)
  ours = model.apply({"params": params}, image=images, text=text)[:2]
  reference = open_clip_outputs(oc, images, text)[:2]
  for a, b in zip(ours, reference):
    assert rel_err(a, b) <= RTOL

  # HF directory (safetensors); OpenAI's vocabulary size selects the CLIP BPE tokenizer.
  hf = hf_model("clip", vocab_size=49408, eos_token_id=49407)
  hf.save_pretrained(tmp_path / "hf")
  convert_checkpoint.main(["--from", "hf", "--source", str(tmp_path / "hf"), "--out", str(tmp_path / "hf_export")])
  model, params, tokenizer = mmjax.load(str(tmp_path / "hf_export"))
  text = tokenizer.encode(["a photo of a dog", "a red circle"], 16)
  ours = model.apply({"params": params}, image=images, text=text)[:2]
  for a, b in zip(ours, hf_outputs(hf, images, text)[:2]):
    assert rel_err(a, b) <= RTOL
  hf_siglip = hf_model("siglip")
  hf_siglip.save_pretrained(tmp_path / "hf_siglip")
  with pytest.raises(ConversionError, match="pass --tokenizer"):
    convert_checkpoint.convert("hf", str(tmp_path / "hf_siglip"), str(tmp_path / "no_tok"))


def test_convert_cli_big_vision_with_a_sentencepiece_tokenizer(tmp_path):
  from mmjax.data.tokenizer import SHAPES_MODEL
  hf = hf_model("siglip", vocab_size=160, eos_token_id=2)
  npz = big_vision_npz(hf, tmp_path / "siglip.npz")
  convert_checkpoint.main(["--from", "big_vision", "--source", str(npz), "--tokenizer", str(SHAPES_MODEL),
                "--out", str(tmp_path / "export")])
  model, params, tokenizer = mmjax.load(str(tmp_path / "export"))
  assert (tokenizer.pad, tokenizer.clean) == ("eos", "lower")
  text = tokenizer.encode(["A Red Circle", "two objects: a blue star and a green cross"], 16)
  assert text[0, -1] == tokenizer.eos_id  # Padded with EOS, SigLIP's convention.
  images, _ = inputs(32, 100, 16, eos=99, batch=2)
  for a, b in zip(model.apply({"params": params}, image=images, text=text)[:2], hf_outputs(hf, images, text)[:2]):
    assert rel_err(a, b) <= RTOL


class Arbitrary:
  """A class torch.load(weights_only=True) must refuse to unpickle."""


def test_convert_refuses_pickles_that_are_not_state_dicts(tmp_path):
  torch.save({"model": Arbitrary()}, tmp_path / "pickle.pt")
  with pytest.raises(ConversionError, match="weights_only=True"):
    convert_checkpoint.load_torch_state_dict(tmp_path / "pickle.pt")


def test_convert_and_compare_notebook(tmp_path):
  config = tmp_path / "tiny.json"
  config.write_text(json.dumps(dict(embed_dim=24, quick_gelu=True, vision_cfg=TINY_OC_VISION,
                                    text_cfg={**TINY_OC_TEXT, "vocab_size": 49408})))
  text, images = run_notebook("convert_and_compare.ipynb", tmp_path, OPEN_CLIP_CONFIG=str(config))
  rows = [line.split() for line in text.splitlines() if line.startswith(("image embeddings", "text embeddings", "logits"))]
  assert len(rows) == 3 and all(float(row[-1]) <= RTOL for row in rows), text
  assert images >= 1
