"""benchmarks/suite_time.py: the plugin records each test, the summary adds
them up by file."""

import json
import pathlib
import sys

import pytest

pytest_plugins = ["pytester"]

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]
                       / "benchmarks"))
import suite_time  # noqa: E402  pylint: disable=g-import-not-at-top


def test_the_plugin_records_every_test_with_its_compile_time(
    pytester, tmp_path, monkeypatch):
  monkeypatch.setenv("SUITE_TIME_DIR", str(tmp_path / "rows"))
  monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
  pytester.makepyfile(test_inner="""
import jax
import jax.numpy as jnp

def test_compiles():
  assert float(jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.float32(0.25))) > 0

def test_plain():
  assert 1 + 1 == 2
""")
  # An outer session already recording (as when the suite runs under the
  # plugin): the inner run's rows are its own, the outer's stay.
  outer = {"id": "outer::test"}
  sessions = suite_time._sessions  # pylint: disable=protected-access
  suite_time.pytest_sessionstart(None)
  sessions[-1].append(outer)
  result = pytester.runpytest_inprocess("-p", "suite_time", "-q")
  result.assert_outcomes(passed=2)
  assert sessions.pop() == [outer]
  rows = json.loads((tmp_path / "rows" / "rows_main.json").read_text())
  by_name = {r["id"].split("::")[1]: r for r in rows}
  assert sorted(by_name) == ["test_compiles", "test_plain"]
  assert by_name["test_compiles"]["compile"] > 0
  assert by_name["test_compiles"]["trace"] > 0
  assert by_name["test_plain"]["compile"] == 0
  programs = by_name["test_compiles"]["programs"]
  assert any("lambda" in name for name in programs), programs
  assert sum(secs for _, secs in programs.values()) == pytest.approx(
      by_name["test_compiles"]["compile"])
  assert by_name["test_plain"]["programs"] == {}
  for r in rows:
    assert r["wall"] > 0 and r["cpu"] >= 0 and r["child"] >= 0
    assert r["process_began"] <= r["began"]


def test_summary_adds_up_by_file(tmp_path):
  row = lambda i, f, cpu: {"id": f"tests/{f}.py::t{i}", "wall": 2.0 * cpu,
                           "cpu": cpu, "child": 1.0, "compile": 0.5,
                           "lower": 0.25, "trace": 0.125, "cache_saved": 0.0}
  (tmp_path / "rows_gw0.json").write_text(json.dumps(
      [row(0, "a", 1.0), row(1, "b", 5.0)]))
  rows = [row(2, "a", 2.0)]
  rows[0]["programs"] = {"jit(_update)": [2, 1.5], "jit(add)": [1, 0.25]}
  (tmp_path / "rows_gw1.json").write_text(json.dumps(rows))
  text = suite_time.summary(tmp_path)
  assert text.endswith("| jit(_update) | 2 | 2 | 1 |\n| jit(add) | 1 | 0 | 1 |")
  lines = text.splitlines()
  assert lines[2] == "| all | 3 | 16 | 8 | 3 | 2 | 1 | 0 | 0 |"
  # Costliest file first: b (5 + 1 s) before a (3 + 2 s).
  assert lines[3].startswith("| tests/b.py | 1 | 10 | 5 | 1 |")
  assert lines[4].startswith("| tests/a.py | 2 | 6 | 3 | 2 |")


def test_timeline_shows_each_worker_and_its_idle_end(tmp_path):
  """gw0 starts at 100, first test at 104, tests for 20 s, done at 130;
  gw1 runs on to 150, so gw0 idled 20 s at the end."""
  def rows(start, spans):
    return [{"id": f"tests/a.py::t{i}", "wall": w, "began": b,
             "process_began": start, "cpu": 0.0, "child": 0.0,
             "compile": 0.0, "lower": 0.0, "trace": 0.0, "cache_saved": 0.0}
            for i, (b, w) in enumerate(spans)]
  (tmp_path / "rows_gw0.json").write_text(json.dumps(
      rows(100.0, [(104.0, 6.0), (120.0, 10.0), (110.0, 4.0)])))
  (tmp_path / "rows_gw1.json").write_text(json.dumps(
      rows(101.0, [(103.0, 47.0)])))
  text = suite_time.summary(tmp_path)
  assert text.endswith("| gw0 | 4 | 20 | 20 |\n| gw1 | 2 | 47 | 0 |"), text


def test_slow_modules_run_first_each_whole_and_in_order():
  from tests import conftest  # pylint: disable=g-import-not-at-top

  class Item:
    def __init__(self, nodeid, slow=False):
      self.nodeid, self.slow = nodeid, slow

    def get_closest_marker(self, name):
      return object() if name == "slow" and self.slow else None

  ids = [("a.py::x", False), ("b.py::y", False), ("b.py::z", True),
         ("c.py::u", False), ("d.py::v", True), ("d.py::w", False)]
  items = [Item(i, s) for i, s in ids]
  conftest._slow_modules_first(items)  # pylint: disable=protected-access
  assert [i.nodeid for i in items] == [
      "b.py::y", "b.py::z", "d.py::v", "d.py::w", "a.py::x", "c.py::u"]
