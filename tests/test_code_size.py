"""Size limits of the package's code: every module of `entropo/` at most
500 lines, every function (or method) at most 90, counted from its `def`
(decorators excluded) to its last line, docstring included. A unit over
the limit is split by concept, not squeezed."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "entropo"
MODULE_LINES = 500
FUNCTION_LINES = 90


def _oversized(root=ROOT):
  """`(modules, functions)` over the limits, as `path (N lines)` and
  `path::qualified.name (N lines)`."""
  modules, functions = [], []
  for path in sorted(root.rglob("*.py")):
    source = path.read_text()
    name = path.relative_to(root.parent).as_posix()
    lines = len(source.splitlines())
    if lines > MODULE_LINES:
      modules.append(f"{name} ({lines} lines)")
    stack = [(node, "") for node in ast.parse(source).body]
    while stack:
      node, prefix = stack.pop()
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                           ast.ClassDef)):
        qualified = prefix + node.name
        if not isinstance(node, ast.ClassDef):
          size = node.end_lineno - node.lineno + 1
          if size > FUNCTION_LINES:
            functions.append(f"{name}::{qualified} ({size} lines)")
        stack.extend((child, qualified + ".") for child in node.body)
      else:
        stack.extend((child, prefix) for child in ast.iter_child_nodes(node)
                     if isinstance(child, ast.stmt))
  return modules, sorted(functions)


def test_modules_and_functions_stay_small():
  modules, functions = _oversized()
  assert not modules and not functions, (
      f"over {MODULE_LINES} lines: {', '.join(modules) or 'none'}; over "
      f"{FUNCTION_LINES} lines: {', '.join(functions) or 'none'}")


def test_the_checker_counts_def_to_last_line(tmp_path):
  package = tmp_path / "entropo"
  package.mkdir()
  body = [f"x{i} = {i}" for i in range(FUNCTION_LINES - 2)]
  # def + docstring + body: exactly the limit.
  (package / "ok.py").write_text("def f():\n  \"\"\"Doc.\"\"\"\n" + "".join(
      f"  {line}\n" for line in body))
  # A method two lines over (its nested function counts), in a long module.
  (package / "big.py").write_text(
      "class C:\n  @staticmethod\n  def g():\n    \"\"\"Doc.\"\"\"\n"
      + "".join(f"    {line}\n" for line in body)
      + "    def h():\n      return 1\n" + "\n" * MODULE_LINES)
  modules, functions = _oversized(package)
  assert modules == [f"entropo/big.py ({FUNCTION_LINES + 4 + MODULE_LINES}"
                     f" lines)"]
  assert functions == [f"entropo/big.py::C.g ({FUNCTION_LINES + 2} lines)"]
