"""Real English prose from the Python standard library's docstrings, read without importing.

Modules are found with `pkgutil.iter_modules` over the stdlib directory and read
with `ast` (no module is imported, so nothing runs: `antigravity`, `this`, GUI
toolkits are all safe); builtin C modules (`sys.builtin_module_names`, importable
without side effects) add their docstrings through `inspect`. Each docstring is
cut into paragraphs; a paragraph is kept when it reads like prose (see
`is_prose`), then exact duplicates are dropped. The order is sorted by module
name, then source order, so the corpus is a pure function of the Python version.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil
import re
import sys
import sysconfig
import zlib
from typing import Iterator

# Packages skipped wholesale: test suites, GUI/demo code, vendored tools.
_SKIP_PACKAGES = frozenset({
    "test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
    "pydoc_data", "site-packages", "dist-packages", "__phello__", "config-3", "venv",
})
_CODE_CHARS = set("=(){}[]<>_*#|\\/$@%^~`")
_TEST_MODULO = 10  # A module goes to the test split when crc32(name) % 10 == 0 (~10%).


def is_prose(paragraph: str) -> bool:
  """True when a paragraph looks like English sentences rather than code or tables."""
  words = paragraph.split()
  if not 6 <= len(words) <= 400:
    return False
  if not paragraph[0].isalpha() or not paragraph[0].isupper():
    return False
  letters = sum(c.isalpha() or c.isspace() for c in paragraph)
  if letters < 0.85 * len(paragraph):
    return False
  if sum(c in _CODE_CHARS for c in paragraph) > 0.02 * len(paragraph):
    return False
  return "." in paragraph


def _paragraphs(doc: str) -> Iterator[str]:
  """Splits a cleaned docstring at blank lines; drops indented (code/table) blocks."""
  for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
    lines = block.splitlines()
    if not lines or any(l.startswith((" ", "\t", ">>>", "..")) for l in lines):
      continue
    yield " ".join(l.strip() for l in lines)


def _docstrings_from_source(path: str) -> Iterator[tuple[str, str]]:
  """Yields (qualified name, docstring) for the module, its classes and functions."""
  try:
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
  except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
    return

  def visit(node, prefix):
    doc = ast.get_docstring(node, clean=False)
    if doc:
      yield prefix, doc
    for child in node.body:
      if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        yield from visit(child, f"{prefix}.{child.name}")

  yield from visit(tree, "")


def _stdlib_module_files() -> list[tuple[str, str]]:
  """Returns sorted (module name, source path) for pure-Python stdlib modules."""
  root = sysconfig.get_paths()["stdlib"]
  out = []

  def walk(path, prefix):
    for info in pkgutil.iter_modules([path]):
      if info.name in _SKIP_PACKAGES or info.name.startswith("config-"):
        continue
      name = prefix + info.name
      if info.ispkg:
        pkg_dir = os.path.join(path, info.name)
        out.append((name, os.path.join(pkg_dir, "__init__.py")))
        walk(pkg_dir, name + ".")
      else:
        src = os.path.join(path, info.name + ".py")
        if os.path.exists(src):
          out.append((name, src))

  walk(root, "")
  return sorted(out)


def _builtin_docstrings(name: str) -> Iterator[tuple[str, str]]:
  """Yields (qualified name, docstring) of a builtin C module and its public members."""
  module = importlib.import_module(name)
  if module.__doc__:
    yield "", module.__doc__
  for attr in sorted(dir(module)):
    if attr.startswith("_"):
      continue
    doc = getattr(getattr(module, attr, None), "__doc__", None)
    if isinstance(doc, str) and doc:
      yield f".{attr}", doc


def iter_records(split: str) -> Iterator[dict[str, str]]:
  """Yields {"text", "source"} paragraphs of one split ("train" or "test"), deduplicated."""
  if split not in ("train", "test"):
    raise ValueError(f"split={split!r} is not accepted: expected 'train' or 'test'")
  seen: set[int] = set()
  sources = [(n, lambda p=p: _docstrings_from_source(p)) for n, p in _stdlib_module_files()]
  sources += [(n, lambda n=n: _builtin_docstrings(n)) for n in sys.builtin_module_names
              if not n.startswith("_")]
  sources.sort(key=lambda s: s[0])
  for module, docs in sources:
    in_test = zlib.crc32(module.encode()) % _TEST_MODULO == 0
    if in_test != (split == "test"):
      continue
    for qualname, doc in docs():
      for para in _paragraphs(doc):
        if not is_prose(para):
          continue
        key = zlib.crc32(para.lower().encode())  # Dedupe across modules (and splits' order).
        if key in seen:
          continue
        seen.add(key)
        yield {"text": para, "source": module + qualname}
