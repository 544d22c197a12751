"""What a training run optimises. `get(name)` returns the task class named by `config.task`."""
from __future__ import annotations

from mmjax.errors import ConfigError


def get(name: str):
  if name == "contrastive":
    from mmjax.tasks.contrastive import ContrastiveTask
    return ContrastiveTask
  if name == "generative":
    from mmjax.tasks.generative import GenerativeTask
    return GenerativeTask
  if name == "classification":
    from mmjax.tasks.classification import ClassificationTask
    return ClassificationTask
  if name == "fusion":
    from mmjax.tasks.fusion import FusionTask
    return FusionTask
  if name == "prompt_learning":
    from mmjax.tasks.prompt_learning import PromptLearningTask
    return PromptLearningTask
  raise ConfigError(f"config.task={name!r} is not a known task; known: ['contrastive', 'generative', "
                    "'classification', 'fusion', 'prompt_learning']")
