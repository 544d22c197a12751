"""The base-to-novel runner on an ImageFolder tree, and notebooks/adaptation.ipynb, on a tiny backbone."""
import os

import jax
import numpy as np
import pytest
from PIL import Image

from mmjax import bundle, config as mmjax_config, runs
from mmjax import base_to_novel
from tests.helpers import run_notebook, tiny_config, trained_tiny_backbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235), "white": (240, 240, 240)}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
  """A tiny two-tower run trained until it tells colours apart, and its export."""
  return trained_tiny_backbone(tmp_path_factory)


def _image_folder(root, per_class=12):
  """root/<colour>_square/<i>.png: a coloured square on noise, 40 px (resized to the model's 32)."""
  rng = np.random.default_rng(0)
  for name, rgb in COLOURS.items():
    os.makedirs(root / f"{name}_square")
    for i in range(per_class):
      image = rng.integers(0, 40, (40, 40, 3), dtype=np.uint8)
      x, y = rng.integers(2, 20, 2)
      image[y:y + 16, x:x + 16] = rgb
      Image.fromarray(image).save(root / f"{name}_square" / f"{i}.png")
  return str(root)


def _recipe(method, backbone_dir, folder):
  c = mmjax_config.load(os.path.join(REPO, "configs", f"prompt_shapes.py:method={method}"))
  c.model = tiny_config().model
  c.data.update(source="image_folder", image_root=folder, image_size=32, shots=2, test_per_class=10,
                batch_size=8)
  c.init_from = (("base", backbone_dir),)
  c.total_steps = c.eval_every = c.checkpoint_every = 2
  c.optim.warmup_steps = 1
  return c


def test_base_to_novel_runs_every_kind_of_method_on_an_image_folder(backbone, tmp_path):
  run_dir, _ = backbone
  folder = _image_folder(tmp_path / "folder")
  results = base_to_novel.run(lambda m: _recipe(m, run_dir, folder), str(tmp_path / "b2n"),
                              methods=("zeroshot", "linear_probe", "coop"), seeds=(0, 1))
  # 4 classes, half base: 2 base classes x 10 test images (the 12 - 2 shots left). Chance is 10 of the 20, and
  # 16 or more happen by chance 0.6% of the time; each method measured 20 of 20 (zero-shot and CoOp 7 to 10
  # on a backbone trained 2 steps).
  for method, r in results.items():
    assert len(r["seeds"]) == 2
    for seed in r["seeds"]:
      assert seed["base_acc"] >= 1.6 * 0.5, (method, seed, "want 1.6 x chance (1/2)")
      assert seed["base_acc"] * 20 == pytest.approx(round(seed["base_acc"] * 20))
      if "novel_acc" in seed:
        a, b = seed["base_acc"], seed["novel_acc"]
        assert seed["hm"] == pytest.approx(2 * a * b / (a + b) if a + b else 0.0)
  assert results["zeroshot"]["mean"]["trainable"] == 0
  assert results["linear_probe"]["mean"]["trainable"] == 32 * 2 + 2  # [embed_dim, base classes] + bias.
  assert results["coop"]["mean"]["trainable"] == 4 * 32  # 4 context vectors of the text width.
  assert os.path.exists(tmp_path / "b2n" / "coop_1" / "summary.json")
  table = base_to_novel.table(results)
  assert table.splitlines()[0].split() == ["method", "base", "novel", "HM", "trainable", "s/run"]
  assert len(table.splitlines()) == 2 + 3


def test_adaptation_notebook_trains_coop_and_lora_and_plots(backbone, tmp_path):
  _, out = backbone
  printed, images = run_notebook("adaptation.ipynb", tmp_path, MMJAX_EXPORT=out, MMJAX_WORKDIR=str(tmp_path / "adapt"),
                                 MMJAX_STEPS="3", MMJAX_SHOTS="2", MMJAX_TEST_PER_CLASS="2")
  assert "24 base classes (2 shots each), 24 novel classes" in printed
  assert "coop {'base_acc'" in printed and "lora {'base_acc'" in printed
  # Both methods trained and checkpointed; the base model stayed as exported.
  base = bundle.load(out)[1]
  for method in ("coop", "lora"):
    params = runs.load_params(str(tmp_path / "adapt" / method))
    assert all((a == b).all() for a, b in zip(jax.tree.leaves(params["base"]), jax.tree.leaves(base)))
  assert images == 1
