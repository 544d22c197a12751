"""What a training run optimises. `get(name)` returns the task class named by `config.task`."""
from __future__ import annotations

from mmjax.errors import ConfigError
from mmjax.tasks.base import Task
from mmjax.tasks.classification import ClassificationTask
from mmjax.tasks.contrastive import ContrastiveTask
from mmjax.tasks.fusion import FusionTask
from mmjax.tasks.generative import GenerativeTask
from mmjax.tasks.prompt_learning import PromptLearningTask

TASKS: dict[str, type[Task]] = {"contrastive": ContrastiveTask, "generative": GenerativeTask,
                                "classification": ClassificationTask, "fusion": FusionTask,
                                "prompt_learning": PromptLearningTask}


def get(name: str) -> type[Task]:
  if name not in TASKS:
    raise ConfigError(f"config.task={name!r} is not a known task; known: {sorted(TASKS)}")
  return TASKS[name]
