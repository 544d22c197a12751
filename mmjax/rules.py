"""Regex rules over parameter paths: `[(regex, value), ...]`, first match wins.

Freezing, learning-rate multipliers and (later) LoRA targets and sharding overrides
are all written this way. A path is the `/`-joined parameter name, e.g.
`img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel`.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax

from mmjax.errors import ConfigError


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def tree_paths(tree) -> Any:
  """A tree of the same structure holding each leaf's `/`-joined path."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), tree)


def matcher(rules: Sequence[tuple[str, Any]], default, *, what: str = "rules") -> Callable[[str], Any]:
  """`path -> value` of the first rule whose regex `re.search`es the path (`default` if none)."""
  compiled = []
  for rule in rules:
    if len(rule) != 2:
      raise ConfigError(f"{what}: each rule is a (regex, value) pair, got {rule!r}")
    try:
      compiled.append((re.compile(rule[0]), rule[1]))
    except re.error as e:
      raise ConfigError(f"{what}: bad regex {rule[0]!r}: {e}") from e
  return lambda path: next((v for pattern, v in compiled if pattern.search(path)), default)


def match(rules: Sequence[tuple[str, Any]], tree, default, *, what: str = "rules") -> Any:
  """Maps every leaf to the value of the first rule whose regex `re.search`es its path."""
  return jax.tree.map(matcher(rules, default, what=what), tree_paths(tree))
