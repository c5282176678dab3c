"""docs/tasks.md's examples run as written, and say what they return."""

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "tasks.md"


def _blocks():
  return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_verify_example_returns_what_its_comments_say():
  code = _blocks()[0]
  namespace = {}
  lines = code.strip().splitlines()
  checked = 0
  for line in lines:
    statement, _, comment = line.partition("#")
    if statement.strip().startswith("task.verify"):
      reward = eval(statement.strip(), namespace)  # pylint: disable=eval-used
      expected = re.search(r"reason='(\w+)'", comment).group(1)
      assert reward.reason == expected, (statement, reward)
      score = re.search(r"score=([\d.]+)", comment).group(1)
      assert reward.score == float(score)
      checked += 1
    else:
      exec(statement, namespace)  # pylint: disable=exec-used
  assert checked == 3
  assert namespace["record"]["prompt"] in comment_of(code, "record = ")


def comment_of(code, prefix):
  line = next(l for l in code.splitlines() if l.startswith(prefix))
  return line.partition("#")[2]


def test_data_example_runs(tmp_path):
  code = _blocks()[1].replace("/tmp/tfds", str(tmp_path)).replace(
      '"train": 20000', '"train": 200')
  namespace = {}
  exec(compile(code, str(DOC), "exec"), namespace)  # pylint: disable=exec-used
  batch = next(namespace["batches"])
  assert namespace["state"] is not None
  assert batch is not None
