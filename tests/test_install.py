"""A built wheel in a fresh virtual environment, used from a directory outside the repository: the
recipes ship with it, so `--config <name>` trains, and the run exports and evaluates from there."""
import json
import os
import re
import shutil
import subprocess
import sys
import venv

import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def wheel_env(tmp_path_factory):
  """`(python, wheel)`: the Python of a new venv holding the wheel built from a copy of the sources
  and its dependencies (from pip's cache or the package index), and nothing of this checkout."""
  tmp = tmp_path_factory.mktemp("wheel")
  source = tmp / "source"
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in ("mmjax", "configs"):
    shutil.copytree(os.path.join(REPO, name), source / name, ignore=ignore)
  for name in ("setup.py", "README.md"):
    shutil.copy(os.path.join(REPO, name), source / name)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                  "-w", str(tmp / "dist")], check=True, capture_output=True, timeout=300)
  (wheel,) = (tmp / "dist").iterdir()
  venv.create(tmp / "venv", with_pip=True)
  python = str(tmp / "venv" / "bin" / "python")
  subprocess.run([python, "-m", "pip", "install", "-q", str(wheel)], check=True, capture_output=True, timeout=900)
  return python, wheel


def _user_env():
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  return {**env, "JAX_PLATFORMS": "cpu"}


def _wheel_run(python, *args, cwd, **env):
  done = subprocess.run([python, *args], cwd=cwd, env={**_user_env(), **env}, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_the_wheel_trains_a_recipe_by_name_from_any_directory(wheel_env, tmp_path):
  python, _ = wheel_env
  env = _user_env()
  where = subprocess.run([python, "-c", "import mmjax; print(mmjax.__file__)"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout
  assert not where.startswith(REPO), where  # The installed package, not this checkout.
  proc = subprocess.run([python, "-m", "mmjax.train", "--config", "siglip_shapes", "--workdir", "run",
                         "--config.total_steps=4", "--config.log_every=2", "--config.eval_every=0",
                         "--config.data.batch_size=16"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "warming up over 0 steps" in proc.stderr  # The recipe's warmup of 100 fits a 4-step trial.
  with open(tmp_path / "run" / "summary.json") as f:
    assert json.load(f)["steps"] == 4
  # The export evaluates from the wheel too: a benchmark on an image folder, and the loaded model's
  # own preprocessing on an image of another size.
  for label, colour in enumerate(((255, 0, 0), (0, 0, 255))):
    os.makedirs(tmp_path / "folder" / f"class{label}")
    for i in range(2):
      Image.new("RGB", (40 + 8 * i, 30), colour).save(tmp_path / "folder" / f"class{label}" / f"{i}.png")
  for command in (["mmjax.export", "--workdir", "run", "--out", "export"],
                  ["mmjax.evaluate", "--export", "export", "--benchmark", "zeroshot_classification", "--data",
                   "folder", "--out", "zs.json"]):
    done = subprocess.run([python, "-m", *command], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
  assert json.load(open(tmp_path / "zs.json"))["metrics"]["images"] == 4
  script = ("import mmjax; from PIL import Image; m = mmjax.load('export'); "
            "x = m.preprocess(Image.open('folder/class0/1.png')); print(x.shape, m.encode_image(x).shape)")
  shapes = subprocess.run([python, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert shapes.stdout.strip() == "(1, 64, 64, 3) (1, 96)", shapes.stderr[-2000:]
  # A recipe that imports another (`from configs import siglip_shapes`) loads from the wheel, by
  # name and by the path it has in the package.
  for spec in ("lit_shapes", "mmjax/configs/swin_shapes.py"):
    loaded = subprocess.run([python, "-c", f"from mmjax import config; print(config.load({spec!r}).task)"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "contrastive", loaded.stderr[-2000:]


def test_every_notebook_installs_itself_prints_its_devices_and_is_run_by_a_test():
  import glob
  import nbformat
  tests = "".join(open(path, encoding="utf-8").read() for path in glob.glob(os.path.join(REPO, "tests", "test_*.py")))
  with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
    url = re.search(r'url="([^"]+)"', f.read()).group(1)  # The project's repository, the install default.
  notebooks = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
  assert len(notebooks) >= 5
  for path in notebooks:
    code = [cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]
    assert f'"MMJAX_SOURCE", "git+{url}"' in code[0] and "pip" in code[0] and "MMJAX_SKIP_INSTALL" in code[0], path
    assert "jax.devices()" in code[1] and "default_backend" in code[1], path
    assert f'run_notebook("{os.path.basename(path)}"' in tests, f"no test executes {path}"


def test_the_wheel_with_its_extras_converts_fine_tunes_and_runs_the_notebooks(wheel_env, tmp_path):
  """`pip install "mmjax[interop,dev]"` in the same venv (the CPU torch this checkout tests with), then
  the README's conversion and fine-tuning commands and two notebooks, all with that venv's Python."""
  torch = pytest.importorskip("torch")
  open_clip = pytest.importorskip("open_clip")
  from importlib.metadata import version
  from mmjax.data import shapes
  from tests.test_interop import TINY_OC_TEXT, TINY_OC_VISION
  python, wheel = wheel_env
  subprocess.run([python, "-m", "pip", "install", "-q", f"{wheel}[interop,dev]", f"torch=={version('torch')}",
                  f"torchvision=={version('torchvision')}"], check=True, capture_output=True, timeout=1200)
  cfg = dict(embed_dim=24, vision_cfg=TINY_OC_VISION, text_cfg={**TINY_OC_TEXT, "vocab_size": 49408})
  torch.manual_seed(0)
  torch.save(open_clip.CLIP(**cfg).state_dict(), tmp_path / "oc.pt")
  (tmp_path / "oc.json").write_text(json.dumps(cfg))
  data = shapes.retrieval_set(0, 48, 16)
  (tmp_path / "data").mkdir()
  with open(tmp_path / "data" / "caps.jsonl", "w") as f:
    for i, (image, caption) in enumerate(zip(data["images"], data["captions"])):
      Image.fromarray(image).save(tmp_path / "data" / f"{i}.png")
      f.write(json.dumps({"image": f"{i}.png", "caption": caption}) + "\n")
  _wheel_run(python, "-m", "mmjax.convert_checkpoint", "--from", "open_clip", "--source", "oc.pt", "--model-config",
             "oc.json", "--tokenizer", "clip_bpe", "--out", "export", cwd=tmp_path)
  _wheel_run(python, "-m", "mmjax.train", "--config", "finetune:export=export", "--workdir", "ft",
             "--config.data.captions=data/caps.jsonl", "--config.data.batch_size=16", "--config.total_steps=4",
             cwd=tmp_path)
  _wheel_run(python, "-m", "mmjax.export", "--workdir", "ft", "--out", "ft_export", cwd=tmp_path)
  run = ("import sys, nbclient, nbformat; nb = nbformat.read(sys.argv[1], as_version=4); "
         "nbclient.NotebookClient(nb, timeout=600, kernel_name='python3').execute(); "
         "print(''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])))")
  notebooks = os.path.join(REPO, "notebooks")
  text = _wheel_run(python, "-c", run, os.path.join(notebooks, "zero_shot.ipynb"), cwd=tmp_path,
                    MMJAX_SKIP_INSTALL="1", MMJAX_EXPORT="ft_export")
  assert "the shapes demo: 48" in text and "accuracy (chance 0.021)" in text
  text = _wheel_run(python, "-c", run, os.path.join(notebooks, "finetune.ipynb"), cwd=tmp_path,
                    MMJAX_SKIP_INSTALL="1", MMJAX_EXPORT="export", MMJAX_STEPS="4", MMJAX_BATCH="16",
                    MMJAX_WORKDIR="nb")
  assert "after: i2t R@1" in text and os.path.isdir(tmp_path / "nb" / "export")
