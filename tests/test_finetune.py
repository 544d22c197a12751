"""Fine-tuning a converted checkpoint in one command, as the README shows: convert a random-weight
open_clip model, fine-tune it on a folder of captions (softmax, sigmoid, LoRA) with the tokenizer
that came with it, export, and retrieve with the loaded model's own preprocessing."""
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

import mmjax  # noqa: E402
from mmjax.data import shapes  # noqa: E402
from PIL import Image  # noqa: E402
from tests.helpers import logged_losses, run_module  # noqa: E402
from tests.test_interop import TINY_OC_TEXT, TINY_OC_VISION  # noqa: E402

STEPS = 60


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A directory outside the repository with an open_clip export (random weights, CLIP's BPE
  vocabulary) and 32 captioned 48 px images in a tab-separated file with its own column names."""
  tmp = tmp_path_factory.mktemp("finetune")
  cfg = dict(embed_dim=24, vision_cfg=TINY_OC_VISION, text_cfg={**TINY_OC_TEXT, "vocab_size": 49408})
  torch.manual_seed(0)
  torch.save(open_clip.CLIP(**cfg).state_dict(), tmp / "oc.pt")
  (tmp / "oc.json").write_text(json.dumps(cfg))
  run_module("mmjax.convert_checkpoint", "--from", "open_clip", "--source", "oc.pt", "--model-config", "oc.json",
       "--tokenizer", "clip_bpe", "--out", "export", cwd=tmp)
  data = shapes.retrieval_set(0, 48, 32)
  (tmp / "data").mkdir()
  lines = ["path\ttext"]
  for i, (image, caption) in enumerate(zip(data["images"], data["captions"])):
    Image.fromarray(image).save(tmp / "data" / f"{i}.png")
    lines.append(f"{i}.png\t{caption}")
  (tmp / "data" / "caps.tsv").write_text("\n".join(lines) + "\n")
  return tmp, data


def _finetune(tmp, workdir, arg, steps=STEPS):
  return run_module("mmjax.train", "--config", f"finetune:export=export,{arg}", "--workdir", workdir,
              "--config.data.captions=data/caps.tsv", "--config.data.csv_image_key=path",
              "--config.data.csv_caption_key=text", "--config.data.batch_size=16", f"--config.total_steps={steps}",
              "--config.optim.lr=3e-3", cwd=tmp)


def test_a_converted_clip_fine_tunes_with_its_own_tokenizer_and_retrieves_its_captions(converted):
  tmp, data = converted
  log = _finetune(tmp, "softmax", "loss=softmax")
  assert "all params from export" in log
  losses = logged_losses(str(tmp / "softmax"))
  assert losses[-1] < 0.4 * losses[0], losses  # Measured 2.82 -> 0.48 (seed 0).
  loaded = mmjax.load(str(_export(tmp, "softmax")))
  assert type(loaded.tokenizer).__name__ == "ClipBpeTokenizer" and loaded.image_size == 32
  images = [Image.open(tmp / "data" / f"{i}.png") for i in range(32)]  # 48 px files, resized by preprocess.
  best = (loaded.encode_image(images) @ loaded.encode_text(data["captions"]).T).argmax(axis=1)
  captions = np.array(data["captions"])
  recall = float(np.mean(captions[best] == captions))  # A scene's twin may share its caption.
  before = mmjax.load(str(tmp / "export"))
  best_before = (before.encode_image(images) @ before.encode_text(data["captions"]).T).argmax(axis=1)
  assert recall >= 0.5 and recall >= 3 * float(np.mean(captions[best_before] == captions)), recall


def test_lora_trains_only_the_adapter_and_sigmoid_adds_a_bias_to_a_clip(converted):
  tmp, _ = converted
  log = _finetune(tmp, "lora", "lora=True")
  assert "params['base'] from export" in log
  losses = logged_losses(str(tmp / "lora"))
  assert losses[-1] < 0.5 * losses[0], losses  # Measured 3.13 -> 0.77.
  _, params, _ = mmjax.load(str(_export(tmp, "lora")))
  _, pretrained, _ = mmjax.load(str(tmp / "export"))
  jax.tree.map(np.testing.assert_array_equal, params["base"], pretrained)  # The export stayed frozen.
  log = _finetune(tmp, "sigmoid", "loss=sigmoid", steps=4)
  assert "new, not in export: b" in log
  _, tuned, _ = mmjax.load(str(_export(tmp, "sigmoid")))
  assert set(tuned) == {"img", "txt", "t", "b"} and set(pretrained) == {"img", "txt", "t"}


def _export(tmp, workdir):
  run_module("mmjax.export", "--workdir", workdir, "--out", f"{workdir}_export", cwd=tmp)
  return tmp / f"{workdir}_export"
