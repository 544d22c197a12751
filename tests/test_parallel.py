"""The same tiny model trained on 1 device, 8-way data parallel and a 2x4 data x fsdp mesh, with
the batch split as the `batch` axis rule says."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import parallel, runtime
from mmjax.errors import ConfigError, MeshError
from mmjax.rules import path_str
from mmjax.tasks.contrastive import ContrastiveTask
from mmjax.runs import make_train_step, sharded_state
from tests.helpers import tiny_config

STEPS = 3


def _batches(config, vocab):
  rng = np.random.default_rng(0)
  size, b, length = config.data.image_size, config.data.batch_size, config.model.text.max_len
  return [{"image": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32),
           "text": rng.integers(3, vocab, (b, length)).astype(np.int32)} for _ in range(STEPS)]


def _train(mesh_config, n_devices, axis_rules=None, **text_tower):
  config = tiny_config(mesh=mesh_config)
  config.model.text.update(text_tower)
  if axis_rules is not None:
    config.axis_rules = axis_rules
  mesh = parallel.make_mesh(config.mesh, devices=jax.devices()[:n_devices])
  rules = parallel.axis_rules(config.axis_rules, mesh)
  losses, batch_specs = [], set()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    task = ContrastiveTask(config, mesh)
    _, shardings, tx, lr, init = sharded_state(task, config, mesh, rules)
    state = init(jax.random.key(0))
    step = make_train_step(task, tx, lr, shardings, mesh)
    for batch in _batches(config, task.tokenizer.vocab_size):
      batch = parallel.global_batch(batch, mesh)
      batch_specs.update(x.sharding.spec for x in batch.values())
      state, metrics = step(state, batch, jax.random.key(1))
      losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  assert len(batch_specs) == 1
  return np.array(losses), state, batch_specs.pop()


@pytest.fixture(scope="module")
def single():
  return _train((("data", 1),), 1)


@pytest.mark.parametrize("mesh_config", [
    (("data", -1), ("fsdp", 1), ("tensor", 1)),
    (("data", 2), ("fsdp", 4), ("tensor", 1)),
], ids=["data8", "data2xfsdp4"])
def test_sharded_training_matches_one_device(single, mesh_config):
  losses_1, state_1, _ = single
  losses_n, state_n, batch_spec = _train(mesh_config, 8)
  assert batch_spec == P(("data", "fsdp"))  # The default `batch` rule.
  assert losses_1[0, 0] != losses_1[-1, 0]  # The model trains, so the comparison means something.
  # Loss and gradient norm per step (Adam would hide a wrongly scaled gradient from the loss).
  np.testing.assert_allclose(losses_n, losses_1, rtol=1e-5)
  # Attention key biases have an exactly zero gradient (softmax ignores a per-query constant),
  # so Adam turns float noise into lr-sized steps whose sign depends on the reduction order.
  def close(path, a, b):
    if not path_str(path).endswith("key/bias"):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=path_str(path))

  jax.tree_util.tree_map_with_path(close, state_n["params"], state_1["params"])
  kernel = state_n["params"]["img"]["MAPHead_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  mu = state_n["opt"][2].inner_states["1.0"].inner_state[0].mu["img"]["MAPHead_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  fsdp = dict(mesh_config)["fsdp"]
  # Parameters and their Adam moments are split over fsdp: 1/fsdp of the rows per device.
  assert kernel.addressable_shards[0].data.shape == (32 // fsdp, 64)
  assert mu.sharding == kernel.sharding


def test_the_batch_rule_decides_where_the_batch_goes(single):
  # Only `data` splits the batch: the 4 fsdp devices of each data shard hold the same rows, and the
  # ring loss runs over 2 devices; the parameters stay fsdp-sharded.
  rules = tuple(r for r in parallel.DEFAULT_AXIS_RULES if r[0] not in ("batch", "act_batch"))
  rules += (("batch", "data"), ("act_batch", "data"))
  losses_n, state_n, batch_spec = _train((("data", 2), ("fsdp", 4), ("tensor", 1)), 8, axis_rules=rules)
  assert batch_spec == P("data")
  np.testing.assert_allclose(losses_n, single[0], rtol=1e-5)
  kernel = state_n["params"]["img"]["MAPHead_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert kernel.addressable_shards[0].data.shape == (32 // 4, 64)


def test_scanned_text_tower_pooled_at_one_token_trains_sharded_as_on_one_device():
  # The pooled tower scans all but its last layer, then runs that layer's slice of the stacked
  # (fsdp-sharded) parameters for the pooled token alone.
  tower = dict(scan=True, depth=3)
  losses_1, state_1, _ = _train((("data", 1),), 1, **tower)
  losses_n, state_n, _ = _train((("data", 2), ("fsdp", 4), ("tensor", 1)), 8, **tower)
  assert losses_1[0, 0] != losses_1[-1, 0]
  np.testing.assert_allclose(losses_n, losses_1, rtol=1e-5)
  kernel = state_n["params"]["txt"]["Encoder_0"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert kernel.shape == (3, 32, 64) and kernel.addressable_shards[0].data.shape == (3, 32 // 4, 64)


def test_mesh_errors_name_the_problem():
  with pytest.raises(MeshError, match="needs 6 devices"):
    parallel.make_mesh((("data", 2), ("fsdp", 3)), devices=jax.devices()[:8])
  with pytest.raises(MeshError, match="unknown axes"):
    parallel.make_mesh((("model", -1),))
  with pytest.raises(MeshError, match="at most one -1"):
    parallel.make_mesh((("data", -1), ("fsdp", -1)))


def test_multiprocess_environment_detection():
  assert not parallel.in_cluster({})
  assert not parallel.in_cluster({"SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"})
  assert not parallel.in_cluster({"SLURM_NTASKS": "4"})  # sbatch's shell, outside srun
  assert parallel.in_cluster({"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"})
  assert not parallel.in_cluster({"TPU_WORKER_HOSTNAMES": "10.0.0.2"})
  assert parallel.in_cluster({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"})
  assert parallel.in_cluster({"MMJAX_DISTRIBUTED": "1"}) and not parallel.in_cluster({"MMJAX_DISTRIBUTED": "0"})
  with pytest.raises(ConfigError, match="--num_processes, --process_id"):
    parallel.initialize(coordinator_address="localhost:1234")
  assert parallel.initialize() is False  # This test process is no cluster: a no-op.


_FAULTS_AFTER_REALLOC = """
import resource, sys, threading
from mmjax import runtime
if sys.argv[1] == "reuse":
  assert runtime.reuse_freed_host_memory()
def work(out):  # From a thread, as XLA's workers allocate a step's temporaries.
  block = bytearray(256 << 20)  # Zero-filled: every page touched.
  del block
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = bytearray(256 << 20)
  out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
out = []
thread = threading.Thread(target=work, args=(out,))
thread.start(); thread.join()
print(out[0])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_reuse_freed_host_memory_stops_refaulting_large_blocks():
  def faults(mode):
    run = subprocess.run([sys.executable, "-c", _FAULTS_AFTER_REALLOC, mode], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return int(run.stdout.split()[-1])

  default, reused = faults("default"), faults("reuse")
  assert default > 10_000, default  # glibc mmaps the 256 MiB block afresh: its pages fault again.
  assert reused < default / 100, (reused, default)


def test_sequential_cpu_schedule_is_added_once_and_known_to_this_xla(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  assert runtime.prefer_sequential_cpu_schedule()
  assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                     "--xla_cpu_enable_concurrency_optimized_scheduler=false")
  assert not runtime.prefer_sequential_cpu_schedule()  # Never twice, and a user's own setting stays.
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=true")
  assert not runtime.prefer_sequential_cpu_schedule()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true"
  # XLA aborts on flags it does not know: the trainer's setting must be one this jaxlib has.
  script = ("import os; os.environ.pop('XLA_FLAGS', None); from mmjax import runtime; import jax; "
            "assert runtime.tune_cpu_runtime()['sequential_schedule']; print(int(jax.jit(lambda x: x + 1)(1)))")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr[-2000:]
