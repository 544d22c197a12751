"""Self-distillation and masked prediction (SigLIP 2's last fraction of training), in a tiny SigLIP 2
run with every loss that resumes its teacher from the checkpoint: the mask token, the teacher (sharded
like the image tower, one step of its EMA against NumPy from two checkpoints), the losses against their
definition through the model's public outputs, and the export without the decoder."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

import mmjax
from configs import siglip2_shapes
from mmjax import bundle, export, parallel, runs, train
from mmjax.checkpoint import Checkpointer
from mmjax.config import tower
from mmjax.data import pipeline
from mmjax.models.vit import ViT


def test_masked_patches_enter_as_one_learned_token():
  vit = ViT(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, head="none", pool="gap")
  images = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  mask = np.array([[True, False, True, True], [True, False, True, True]])
  params = nn.unbox(vit.init(jax.random.key(0), images, token_mask=mask)["params"])
  encoded = lambda image, **kw: np.asarray(vit.apply({"params": params}, image, **kw)[1]["encoded"])
  np.testing.assert_allclose(encoded(images, token_mask=np.zeros_like(mask)), encoded(images), rtol=1e-6)
  all_masked = encoded(images, token_mask=np.ones_like(mask))
  np.testing.assert_allclose(all_masked[0], all_masked[1], rtol=1e-5, atol=1e-6)  # Nothing of either image is left.
  # Patch 1 is seen: the two images differ there, as they would unmasked.
  assert not np.allclose(encoded(images, token_mask=mask)[0], encoded(images, token_mask=mask)[1])


def tiny_siglip2(**overrides):
  """siglip2_shapes with every loss, tiny towers and 24 px scenes: distillation from step start."""
  c = siglip2_shapes.get_config("max_patches=16")
  c.model.image = tower(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, posemb="learn", pool="map",
                        head="dense", naflex=True, posemb_grid=4)
  c.model.text = tower(vocab_size=None, max_len=16, width=32, depth=1, mlp_dim=64, num_heads=2, pool="last",
                       causal=False, eos_id=2)
  c.model.embed_dim = 32
  c.model.locca.update(width=32, mlp_dim=64, num_heads=2, max_len=32)
  c.data.update(image_size=24, batch_size=16, patch_budgets=(4, 9, 16), pack_images=False)  # Packing: test_naflex.
  c.loss.distill.update(local_patches=4, start=0.5)
  c.evals = dict(batch_size=16, grounding=dict(n=16))
  c.optim.warmup_steps = 1
  c.update(total_steps=3, log_every=1, checkpoint_every=2, eval_every=3, mesh=(("data", 2), ("fsdp", 4), ("tensor", 1)))
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A tiny run trained to step 2, then resumed to step 3 (its teacher from the checkpoint)."""
  workdir = str(tmp_path_factory.mktemp("siglip2"))
  first = train.train(tiny_siglip2(total_steps=2, eval_every=0), workdir)
  return workdir, first, train.train(tiny_siglip2(), workdir)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [m for m in map(json.loads, f) if "loss" in m]


def test_every_loss_trains_and_distillation_starts_at_its_step(tiny_run):
  workdir, first, summary = tiny_run
  logged = _metrics(workdir)
  assert [m["step"] for m in logged] == [1, 2, 3]
  for m in logged:
    assert m["locca/caption"] > 0 and m["locca/referring"] > 0 and m["locca/grounded"] > 0
    assert m["loss"] == pytest.approx(m["contrastive_loss"] + m["locca/loss"] + m["distill/global"]
                                      + m["distill/masked"], rel=1e-5)
  # Distillation from half of total_steps on: the first run's second step, the resumed run's third.
  assert logged[0]["distill/global"] == 0 and logged[0]["distill/masked"] == 0
  assert all(m["distill/global"] > 0 and m["distill/masked"] > 0 for m in logged[1:])
  assert {"grounding/acc@0.5", "grounding/miou", "grounding/centre_acc@0.5"} <= set(summary)
  assert 0 <= summary["grounding/miou"] <= 1


@pytest.fixture(scope="module")
def restored(tiny_run):
  """The tiny run's task and its states at steps 2 and 3, restored onto the 8-device mesh."""
  config, mesh, rules, task = runs.setup(tiny_siglip2())
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract, shardings = runs.sharded_state(task, config, mesh, rules)[:2]
    ckpt = Checkpointer(tiny_run[0], keep=3, writer=False)
    states = {step: ckpt.restore(step, abstract) for step in (2, 3)}
    ckpt.close()
  return config, mesh, rules, task, shardings, states


def test_the_teacher_is_a_checkpointed_ema_sharded_like_the_image_tower(restored):
  config, _, _, _, shardings, states = restored
  assert jax.tree.structure(shardings["teacher"]) == jax.tree.structure(shardings["params"]["img"])
  assert jax.tree.leaves(shardings["teacher"]) == jax.tree.leaves(shardings["params"]["img"])
  assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings["teacher"]))  # fsdp splits some.
  assert all(a.sharding == s for a, s in zip(jax.tree.leaves(states[3]["teacher"]), jax.tree.leaves(shardings["teacher"])))
  decay = config.loss.distill.ema_decay
  before, teacher, student = (jax.tree.leaves(jax.device_get(t)) for t in (
      states[2]["teacher"], states[3]["teacher"], states[3]["params"]["img"]))
  for t2, t3, p3 in zip(before, teacher, student):  # One step of the EMA, in float64.
    np.testing.assert_allclose(t3, decay * np.float64(t2) + (1 - decay) * np.float64(p3), rtol=1e-6, atol=1e-8)
  assert not all(np.allclose(t, p) for t, p in zip(teacher, student))


def test_the_export_drops_the_decoder_and_the_teacher(tiny_run, tmp_path):
  workdir = tiny_run[0]
  out = export.export(workdir, str(tmp_path / "export"))
  model_config, params, _ = bundle.read(out)
  assert "locca" not in model_config and "locca" not in params and set(params) >= {"img", "txt"}
  zimg = mmjax.load(out).encode_image(list(np.zeros((2, 24, 48, 3), np.uint8)))
  assert zimg.shape == (2, 32) and np.allclose(np.linalg.norm(zimg, axis=1), 1, atol=1e-5)


def test_the_distillation_losses_are_their_definition(restored):
  config, mesh, rules, task, _, states = restored
  loader = pipeline.Loader(task.source(config.data), tokenizer=task.tokenizer, image_size=config.data.image_size,
                           max_len=task.max_len, global_batch_size=config.data.batch_size, seed=0, ops=task.data_ops())
  local = next(iter(loader))
  local.pop(pipeline.SKIPPED)
  params, teacher = states[3]["params"], states[3]["teacher"]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch = parallel.global_batch(task.prepare_batch(local), mesh)
    loss_fn = jax.jit(task.loss_fn, static_argnames="train")
    metrics = loss_fn(params, batch, jax.random.key(3), train=False, teacher=teacher, step=2)[1]
  # The global term through the model's public outputs: the teacher's embedding of each whole image
  # and the student's of its local view.
  apply = lambda p, image: np.asarray(task.model.apply({"params": p}, image=image)[0], np.float64)
  params, teacher, local = jax.device_get((params, teacher, local))
  zteacher = apply({**params, "img": teacher}, local["image"])
  zlocal = apply(params, local["image_local"])
  assert float(metrics["distill/global"]) == pytest.approx(np.mean(1 - np.sum(zteacher * zlocal, axis=1)), rel=1e-4)
  assert 0 < float(metrics["distill/masked"]) < 2
