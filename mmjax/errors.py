"""Exceptions that name the culprit: the config key, file, parameter or mesh at fault."""


class MMJaxError(Exception):
  """Base class of every error mmjax raises on purpose."""


class ConfigError(MMJaxError, ValueError):
  """A config key is missing, unknown or has a value that cannot work."""


class MeshError(MMJaxError, ValueError):
  """The requested mesh does not fit the available devices or the batch."""


class BadImageError(MMJaxError, ValueError):
  """An image file is missing, corrupt, truncated or cannot be converted to RGB."""


class DataError(MMJaxError, ValueError):
  """A data source (caption file, class folder, tokenizer model) is malformed."""


class CheckpointError(MMJaxError, RuntimeError):
  """A checkpoint or export directory is missing, incomplete or does not match the model."""


class NonFiniteLossError(MMJaxError, FloatingPointError):
  """The training loss, gradients or parameters became NaN or Inf; the last good checkpoint is left intact."""


class ConversionError(MMJaxError, ValueError):
  """A foreign checkpoint (open_clip, HF, big_vision) does not match the model it converts to."""


class PreemptedError(MMJaxError, RuntimeError):
  """The run was asked to stop (SIGTERM, preemption) and saved a checkpoint first."""
