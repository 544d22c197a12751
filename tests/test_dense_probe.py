"""Dense-feature probes (`mmjax.evals.dense`): mIoU against scikit-learn, patch labels against a
pixel-by-pixel count, the shapes scenes' pixel labels against their pixels, and the contrastive
task's `dense` eval against a float64 NumPy ridge probe on features from the model itself."""
import flax.linen as nn
import jax
import numpy as np
import pytest
from sklearn.metrics import jaccard_score

from configs import siglip2_shapes
from mmjax import runs
from mmjax.data import shapes
from mmjax.evals import benchmarks, dense


def test_mean_iou_matches_scikit_learn():
  rng = np.random.default_rng(0)
  truth = rng.choice([0, 1, 2, 4, 5], size=500)  # Class 3 never occurs, but is predicted.
  predicted = np.where(rng.random(500) < 0.6, truth, rng.integers(0, 6, 500))
  want = jaccard_score(truth, predicted, labels=np.unique(truth), average="macro")
  assert dense.mean_iou(predicted, truth, 6) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("grid", [(3, 5), (4, 4), (12, 10)])
def test_patch_labels_are_each_patchs_most_common_pixel_label(grid):
  maps = np.random.default_rng(1).integers(0, 4, (3, 12, 10))
  got = dense.patch_labels(maps, grid)
  for n in range(3):
    for i in range(grid[0]):
      for j in range(grid[1]):
        rows = [y for y in range(12) if y * grid[0] // 12 == i]
        cols = [x for x in range(10) if x * grid[1] // 10 == j]
        counts = np.bincount(maps[n][np.ix_(rows, cols)].ravel(), minlength=4)
        assert got[n, i * grid[1] + j] == np.argmax(counts)


def test_dense_scenes_label_exactly_the_object_pixels_with_their_class():
  data = shapes.dense_set(n=40, split="train")
  images, labels = data["images"], data["labels"].astype(int)
  np.testing.assert_array_equal(labels > 0, images.max(axis=-1) > 100)
  assert len(np.unique(labels)) > 20
  for label in np.unique(labels[labels > 0]):
    colour = shapes.COLOURS[shapes.COLOUR_NAMES[(label - 1) // len(shapes.SHAPES)]]
    mean = images[labels == label].astype(float).mean(axis=0)
    assert np.abs(mean - colour).max() < shapes.COLOUR_JITTER + shapes.NOISE, (label, mean, colour)
  assert not (shapes.dense_set(n=4, split="test")["images"] == images[:4]).all()


def _numpy_probe(task, params, sizes, l2):
  """The dense eval done independently: the scenes drawn again, features straight from the model, the
  ridge solved in float64."""
  prepare, _ = benchmarks.image_input(task.model_config)
  features, labels = {}, {}
  for split, n in sizes.items():
    data = shapes.dense_set(0, 64, n, split)
    batch = jax.tree.map(lambda *rows: np.stack(rows), *[prepare(image) for image in data["images"]])
    encoded = np.asarray(task.model.apply({"params": params}, image=batch)[2]["img/encoded"], np.float64)
    features[split] = encoded[:, :64].reshape(-1, encoded.shape[-1])  # 8 x 8 patches, no class token.
    labels[split] = dense.patch_labels(data["labels"], (8, 8)).reshape(-1)
  x, n = features["train"], len(features["train"])
  targets = np.eye(1 + len(shapes.CLASSES))[labels["train"]]
  xc, tc = x - x.mean(axis=0), targets - targets.mean(axis=0)
  w = np.linalg.solve(xc.T @ xc + l2 * n * np.eye(x.shape[1]), xc.T @ tc)
  predicted = np.argmax((features["test"] - x.mean(axis=0)) @ w + targets.mean(axis=0), axis=1)
  truth = labels["test"]
  return (jaccard_score(truth, predicted, labels=np.unique(truth), average="macro"),
          float(np.mean(predicted == truth)))


@pytest.mark.parametrize("naflex", [True, False])
def test_the_tasks_dense_eval_is_a_ridge_probe_on_its_patch_features(naflex):
  config = siglip2_shapes.get_config(f"naflex={naflex},locca=False,distill=False")  # The towers alone.
  config.evals = dict(batch_size=32, dense=dict(n_train=24, n_test=12, l2=1e-3))
  task = runs.setup(config).task
  params = nn.unbox(task.init(jax.random.key(0), task.dummy_batch(2)))
  results = task.evaluate(params)
  miou, patch_acc = _numpy_probe(task, params, {"train": 24, "test": 12}, 1e-3)
  assert set(results) == {"dense/miou", "dense/patch_acc"}
  assert results["dense/miou"] == pytest.approx(miou, abs=0.02)
  assert results["dense/patch_acc"] == pytest.approx(patch_acc, abs=0.01)
