"""The package's import graph points down (docs/design.md, "Layers"): no circle, no upward arrow.

Every `import` of ernie5_jax code in ernie5_jax/ (module level and inside functions) is an
edge; each top-level module or package has a layer, and an edge may only go to the same
layer or a lower one, never around a circle.
"""

import ast
import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Lower numbers sit lower: a module may import its own layer or any lower one.
LAYERS = {
    "config": 0, "host_memory": 0,
    "sharding": 1, "distributed": 1,
    "ops": 2,
    "model": 3, "input_pipeline": 3,
    "store": 4,
    "train": 5,
    "generate": 6, "elastic_export": 6, "interop": 6,
    "eval": 7, "rl": 7, "m2cp": 7, "aot": 7,
    "main": 9,
}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in (ROOT / "ernie5_jax").rglob("*.py"):
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    out[name.removesuffix(".__init__")] = path
  return out


def _edges(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  """module -> ernie5_jax modules it imports (a package when no module of the name exists)."""
  edges = collections.defaultdict(set)
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        edges[name].update(a.name for a in node.names if a.name.startswith("ernie5_jax"))
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")
          base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
        if base.startswith("ernie5_jax"):
          for alias in node.names:
            target = f"{base}.{alias.name}"
            edges[name].add(target if target in modules else base)
  return edges


def _layer(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else parts[0]


def test_every_module_has_a_layer():
  missing = sorted({_layer(m) for m in _modules() if _layer(m) not in LAYERS} - {"ernie5_jax"})
  assert not missing, f"add these to LAYERS (and to docs/design.md): {missing}"


def test_imports_point_down():
  upward = sorted(f"{a} -> {b}" for a, targets in _edges(_modules()).items() for b in targets
                  if _layer(a) in LAYERS and _layer(b) in LAYERS
                  and LAYERS[_layer(b)] > LAYERS[_layer(a)])
  assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_circle():
  edges = _edges(_modules())
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done

  def visit(node: str, path: list[str]) -> list[str] | None:
    state[node] = 1
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == 1:
        return path + [node, nxt]
      if nxt not in state:
        found = visit(nxt, path + [node])
        if found:
          return found
    state[node] = 2
    return None

  for module in sorted(edges):
    if module not in state:
      circle = visit(module, [])
      assert circle is None, "import circle: " + " -> ".join(circle)
