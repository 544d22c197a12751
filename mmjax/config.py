"""The full set of config keys with defaults; recipes in `configs/` start here and override.

Every key a recipe may set exists here, so a locked config rejects a misspelt
`--config.key=value` by name.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import sys

import ml_collections
from ml_collections import config_dict

from mmjax import parallel
from mmjax.errors import ConfigError


def as_dict(config) -> dict:
  """A plain dict of a ConfigDict or of any mapping (a model config read from JSON, a test's dict)."""
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def tower(**overrides) -> dict:
  """An image or text tower: `variant` ("B/16") or explicit width/depth/mlp_dim/num_heads."""
  base = dict(variant=None, width=None, depth=None, mlp_dim=None, num_heads=None, head="dense", scan=False,
              remat_policy="none", act="gelu_tanh", dropout=0.0)
  base.update(overrides)
  return base


def swin_tower(**overrides) -> dict:
  """A Swin image tower (`mmjax.models.swin.Swin`): `depths` and `num_heads` per stage, `width` of the first."""
  return dict(arch="swin", width=None, depths=None, num_heads=None, window_size=7, patch_size=4, mlp_ratio=4.0,
              pool="gap", head="dense", act="gelu") | overrides


def vision_layer(index: int = -1) -> config_dict.FieldReference:
  """`config.model.vision_layer` of LLaVA: the ViT layer whose tokens it projects, or "encoded" (a
  Swin tower's output); typed so `--config.model.vision_layer=encoded` overrides an index."""
  return config_dict.FieldReference(index, field_type=object)


def decoder(variant: str, **overrides) -> dict:
  """A decoder of a named size (`mmjax.models.decoder.DECODER_VARIANTS`: "shapes", "llama2-7b", ...);
  its size keys are here, None meaning 'from the variant', so `--config.model.lm.depth=2` overrides
  one. vocab_size None in a variant without one: the tokenizer's."""
  return dict(variant=variant, vocab_size=None, width=None, depth=None, num_heads=None, num_kv_heads=None,
              mlp_dim=None, max_len=None) | overrides


def shapes_vqa_data(**overrides) -> dict:
  """`config.data` of the shapes generative recipes: questions, answers and captions (mmjax.data.shapes_vqa)."""
  return dict(source="shapes_vqa", tokenizer="shapes_vlm", image_size=32, batch_size=64, held_out_fraction=0.2,
              caption_fraction=0.25, media_per_record=1, max_len=48, loss_on="answer", seed=0,
              worker_count=0) | overrides


def base_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Every key with its default. A recipe that takes no argument passes its `arg` here, which
  rejects any (`recipe.py:key=value`) by name; one that takes arguments reads them with `parse_arg`."""
  parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.task = "contrastive"
  c.seed = 0
  c.model = dict(
      image=tower(patch_size=None, posemb="learn", pool="map", pre_norm=False),
      text=tower(vocab_size=None, max_len=32, pool="last", causal=False, eos_id=2),
      embed_dim=128, temperature_init=10.0, bias_init=-10.0, dtype="float32", attention_impl="xla",
      norm_eps=1e-6)
  # kind: sigmoid (SigLIP; impl ring | all_gather | dense), softmax (CLIP), infonce or triplet. num_negatives
  # (infonce, triplet): negatives per anchor, 0 for all; margin and hardest (VSE++) for triplet.
  # decoder_weight (two towers with model.locca): LocCa's decoder loss (captions, referring expressions ->
  # boxes, boxes -> text; mmjax.data.locca) added to the contrastive one with this weight.
  # distill (two towers with a ViT image tower; SILC/TIPS as SigLIP 2 trains): from step start * total_steps
  # on, an EMA teacher (ema_decay, kept from the first step) sees each whole image; the student matches the
  # teacher's embedding from a local view (local_scale of the area; NaFlex: within local_patches) with
  # weight, and at mask_ratio of the patches, replaced by a mask token, the teacher's patch features with
  # masked_weight.
  c.loss = dict(kind="sigmoid", impl="ring", num_negatives=0, margin=0.2, hardest=False, decoder_weight=0.0,
                distill=dict(weight=0.0, masked_weight=0.0, start=0.8, ema_decay=0.99, local_scale=(0.2, 0.5),
                             local_patches=16, mask_ratio=0.5))
  # twins (shapes only): every image comes with a negative differing only in its shapes. pack_text (contrastive,
  # causal text tower pooled at its end of text): captions packed up to captions_per_row per row
  # (mmjax.data.packing).
  # augment (training on folder, webdataset and array_record sources; never on the shapes scenes, whose captions
  # a flip or crop would contradict): random resized crop of crop_scale of the area (None: centre crop, as
  # evaluation), flip, colour_jitter strength (mmjax.data.transforms).
  # per_device_batch_size (scale recipes, as MaxText's): when > 0, the global batch_size is it times the
  # batch-sharded devices of the mesh the run gets (runs.resolve_batch_size). aspect_ratios (shapes only):
  # each record's images are drawn one of these times as wide as high (shorter side image_size).
  # NaFlex image towers (model.image.naflex): max_patches per image; patch_budgets, when set, a budget
  # drawn per image from these (each <= max_patches); pack_images packs up to images_per_row images into
  # each row of max_patches (mmjax.data.packing).
  c.data = dict(source="shapes", tokenizer="shapes", image_size=64, batch_size=128, held_out_fraction=0.2,
                twins=True, captions="", image_root="", shards="", on_bad_image="skip", worker_count=0, seed=0,
                pack_text=False, captions_per_row=6, per_device_batch_size=0, aspect_ratios=(),
                max_patches=0, patch_budgets=(), pack_images=False, images_per_row=4,
                csv_image_key="", csv_caption_key="", csv_separator="",
                augment=dict(crop_scale=(0.9, 1.0), flip=False, colour_jitter=0.0))
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  # Logical axis -> mesh axes: parameters, activations and, through `batch`, the input batch, the
  # losses and the step (mmjax.parallel).
  c.axis_rules = parallel.DEFAULT_AXIS_RULES
  c.optim = dict(lr=1e-3, warmup_steps=100, end_lr_fraction=0.0, weight_decay=1e-4, b1=0.9, b2=0.999,
                 clip_norm=1.0, frozen=(), lr_mults=())
  c.total_steps = 1000
  # (params subtree, run or export dir[, its subtree]): a new run starts that subtree from the
  # run's latest checkpoint or the export (or from the named subtree of those parameters).
  c.init_from = ()
  # Adaptation (mmjax.adapt.wrap): method "" (none), "lora", "adapter" or "prefix"; alpha 0: the rank.
  c.adapt = dict(method="", targets=(), alpha=0.0, dropout=0.0, act="gelu")
  c.log_every = 50
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  c.eval_every = 500
  c.evals = dict(batch_size=256, zeroshot=dict(templates="shapes", per_class=10), retrieval=dict(n=512),
                 binding=dict(n=256))
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """A recipe's argument, `path/to/recipe.py:stage=1,lora=True`, as a ConfigDict of `defaults`.

  `arg` is a comma-separated list of `key=value`; a bare `key` means key=True (a bool default only).
  Each value takes the type of its default: int, float, str, or bool (True, False, true, false, 1, 0).
  An unknown key, or a value that does not convert, raises ConfigError naming it and the recipe's keys."""
  known = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "no arguments"
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, text = (part.strip() for part in item.partition("="))
    if key not in defaults:
      raise ConfigError(f"config argument {key!r} is unknown; the recipe takes {known}")
    default = defaults[key]
    try:
      if isinstance(default, bool):
        values[key] = {"true": True, "1": True, "false": False, "0": False}[text.lower()] if has_value else True
      elif has_value:
        values[key] = type(default)(text)
      else:
        raise ValueError(key)
    except (KeyError, ValueError):
      raise ConfigError(f"config argument {item.strip()!r}: {key} needs a valid {type(default).__name__} "
                        f"(default {default!r}); the recipe takes {known}") from None
  return ml_collections.ConfigDict(values)


# Where the shipped recipes are: `mmjax/configs` in an installed wheel (setup.py maps the checkout's
# `configs/` there), `configs/` next to the package in a checkout.
RECIPE_DIRS = (os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"),
               os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))


def recipe_path(path: str) -> str:
  """The recipe file that `--config` names: an existing file, else a shipped recipe given by name
  (`siglip_shapes`) or as `configs/<name>.py` or `mmjax/configs/<name>.py`, from any directory."""
  if os.path.isfile(path):
    return path
  folder, name = os.path.split(path)
  name = name if name.endswith(".py") else f"{name}.py"
  recipes = next((d for d in RECIPE_DIRS if os.path.isdir(d)), None)
  if folder.rstrip("/") in ("", "configs", "mmjax/configs") and recipes:
    if os.path.isfile(os.path.join(recipes, name)):
      return os.path.join(recipes, name)
  known = sorted(f[:-3] for f in os.listdir(recipes) if f.endswith(".py") and f != "__init__.py") if recipes else []
  close = difflib.get_close_matches(name[:-3], known, n=1)
  hint = f"did you mean {close[0]}? " if close else ""
  raise ConfigError(f"config file {path} does not exist; {hint}the shipped recipes are {', '.join(known)}")


def load(spec: str) -> ml_collections.ConfigDict:
  """The config of a recipe given as `path/to/recipe.py[:arg]` or `name[:arg]`, as `--config` takes it.

  Recipes import each other as `configs.<name>`, so the directory above the file's is importable
  while it loads."""
  path, _, arg = spec.partition(":")
  path = recipe_path(path)
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  added = root not in sys.path
  if added:
    sys.path.insert(0, root)
  try:
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
  finally:
    if added:
      sys.path.remove(root)
