"""The optimizer from `config.optim`: AdamW, warmup + cosine, clipping, regex parameter groups."""
from __future__ import annotations

from typing import Any

from absl import logging
import jax
import optax

from mmjax import rules
from mmjax.errors import ConfigError

_FROZEN = "frozen"


def schedule(optim_config, total_steps: int) -> optax.Schedule:
  """Linear warmup, then cosine decay to `end_lr_fraction` of the peak. A recipe's warmup that does not
  fit a shortened run (`--config.total_steps=30` of a recipe with warmup 100) becomes a tenth of it."""
  warmup = int(optim_config.warmup_steps)
  if warmup < 0:
    raise ConfigError(f"optim.warmup_steps={warmup} must not be negative")
  if warmup >= total_steps:
    logging.warning("optim.warmup_steps=%d does not fit total_steps=%d: warming up over %d steps instead",
                    warmup, total_steps, total_steps // 10)
    warmup = total_steps // 10
  return optax.warmup_cosine_decay_schedule(0.0, optim_config.lr, warmup, total_steps,
                                            end_value=optim_config.lr * optim_config.get("end_lr_fraction", 0.0))


def param_groups(optim_config, params) -> Any:
  """Per-leaf group label: "frozen" or the learning-rate multiplier as a string."""
  frozen = rules.match([(r, True) for r in optim_config.frozen], params, False, what="optim.frozen")
  mults = rules.match(list(optim_config.lr_mults), params, 1.0, what="optim.lr_mults")
  return jax.tree.map(lambda f, m: _FROZEN if f else repr(float(m)), frozen, mults)


def make(optim_config, total_steps: int, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW per group (frozen leaves get no update and no moments); global-norm clipping first.

  Weight decay applies to matrices only (kernels, embeddings), not biases, norms or t/b.
  """
  lr = schedule(optim_config, total_steps)
  labels = param_groups(optim_config, params)
  decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)

  def adamw(mult):
    return optax.adamw(lambda step: lr(step) * mult, b1=optim_config.get("b1", 0.9),
                       b2=optim_config.get("b2", 0.999), weight_decay=optim_config.weight_decay,
                       mask=decay_mask)

  groups = {label: (optax.set_to_zero() if label == _FROZEN else adamw(float(label)))
            for label in set(jax.tree.leaves(labels))}
  is_frozen = jax.tree.map(lambda label: label == _FROZEN, labels)
  chain = [optax.masked(optax.set_to_zero(), is_frozen)]
  if optim_config.clip_norm:
    chain.append(optax.clip_by_global_norm(optim_config.clip_norm))
  chain.append(optax.multi_transform(groups, labels))
  return optax.chain(*chain), lr
