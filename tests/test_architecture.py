"""Imports run one way: entry points -> runs -> tasks -> models/data/adapt/evals/... -> ops/parallel.

The graph is read from the source (every import statement, function-level ones included), so a
lazy import that dodges a cycle counts as the import it is.
"""
import ast
import importlib
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mmjax")
ENTRY_POINTS = {"mmjax.train", "mmjax.export", "mmjax.evaluate", "mmjax.retrieve", "mmjax.compile",
                "mmjax.convert_checkpoint", "mmjax.base_to_novel"}
# Rank of each layer; a module imports only modules of its own rank or lower.
FOUNDATION = {"mmjax.ops", "mmjax.parallel", "mmjax.rules", "mmjax.errors", "mmjax.config", "mmjax.runtime",
              "mmjax.cli"}


def _rank(module: str) -> int:
  if module in ENTRY_POINTS or module == "mmjax":
    return 4
  if module == "mmjax.runs":
    return 3
  if module.startswith("mmjax.tasks"):
    return 2
  if any(module == f or module.startswith(f + ".") for f in FOUNDATION):
    return 0
  return 1  # models, data, adapt, evals, retrieval, interop, bundle, generate, losses, optim, ...


def _modules() -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        module = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[module.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def _imports(module: str, path: str) -> set[str]:
  """The mmjax modules `module` imports (a `from package import name` counts as the submodule
  `package.name` when there is one)."""
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      if base.startswith("mmjax"):
        out.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("mmjax"))
  return out - {module}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
  importlib.import_module(module)


def test_imports_run_one_way():
  upward = sorted(f"{m} (layer {_rank(m)}) imports {t} (layer {_rank(t)})"
                  for m, targets in GRAPH.items() for t in targets
                  if _rank(t) > _rank(m) and m != "mmjax")  # The package's lazy `mmjax.load`.
  assert not upward, "\n".join(upward)


def test_models_data_and_ops_import_no_trainer_task_export_or_entry_point():
  forbidden = ENTRY_POINTS | {"mmjax.runs", "mmjax.bundle"}
  bad = sorted(f"{m} imports {t}" for m, targets in GRAPH.items()
               if m.startswith(("mmjax.models", "mmjax.data", "mmjax.ops")) for t in targets
               if t in forbidden or t.startswith("mmjax.tasks"))
  assert not bad, "\n".join(bad)


def test_data_imports_only_data_and_the_foundation():
  bad = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() if m.startswith("mmjax.data")
               for t in targets if not t.startswith("mmjax.data") and _rank(t) > 0)
  assert not bad, "\n".join(bad)


def test_no_import_cycles():
  """Tarjan's strongly connected components of the module graph: each must be a single module."""
  index, low, on_stack, stack, cycles = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in GRAPH.get(v, ()):
      if w not in MODULES:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for v in sorted(MODULES):
    if v not in index:
      visit(v)
  assert not cycles, cycles


def test_no_module_imports_another_modules_private_names():
  bad = []
  for module, path in MODULES.items():
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmjax"):
        bad += [f"{module}: from {node.module} import {a.name}" for a in node.names
                if a.name.startswith("_") and a.name != "__version__"]
  assert not bad, "\n".join(bad)
