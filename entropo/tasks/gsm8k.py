"""GSM8K-format grade-school maths, read from a local JSONL file.

Each line of the file is `{"question": str, "answer": str}` in GSM8K's
format: the answer is a worked solution ending in `#### <final number>`.
Nothing is downloaded; the user points the task at their own copy.

A problem is `{"question": str, "answer": str}` with `answer` the final
number only, in canonical form (no commas, no trailing decimal zeros, e.g.
"1,234.50" -> "1234.5"). The prompt is

    Question: <question>
    Answer:

and a completion may reason freely. Its answer is the first number after its
last `####` when it has one (the GSM8K convention), otherwise the last number
in the text. Numbers are ASCII digits only (`٧٢` or fullwidth `７２` are not
numbers), may carry a sign, a `$`, thousands commas (`1,234`) and a decimal
part (`3.50`); a sentence's full stop is not part of a number ("1,234." is
1234). Answers compare as exact decimals ("3.50" == "3.5"); a number of more
than `MAX_DIGITS` digits is scored wrong without being converted, so huge
outputs cost no time.
"""

import decimal
import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from entropo.tasks import base

MARKER = "####"
MAX_DIGITS = 100  # longer numbers are wrong answers (references are short)

# A minus sign counts only when it does not follow a letter or digit, so
# "3-5" reads as 3 and 5; commas count only in whole groups of three
# ("1,2345" is 1 and 2345). No nested quantifiers: matching is linear.
_NUMBER = re.compile(r"(?:(?<![0-9A-Za-z])-)?\$?"
                     r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)"
                     r"(?:\.[0-9]+)?")


def _find(text: str) -> tuple[str | None, str]:
  """The answer number in `text` as written, or None and why not."""
  _, marker, tail = text.rpartition(MARKER)
  if marker:
    match = _NUMBER.search(tail)
    if match is None:
      return None, f"no number after the last {MARKER!r}"
    return match.group(), ""
  match = None
  for match in _NUMBER.finditer(text):
    pass
  return (None, "no number in the text") if match is None else (
      match.group(), "")


def _num_digits(number: str) -> int:
  return sum(ch.isdigit() for ch in number)


def _canonical(number: str) -> str:
  """`number` without `$`, commas, leading or trailing zeros ("-0" -> "0")."""
  number = number.replace("$", "").replace(",", "")
  sign = "-" if number.startswith("-") else ""
  whole, _, frac = number.lstrip("-").partition(".")
  whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
  out = f"{whole}.{frac}" if frac else whole
  return out if out == "0" else sign + out


def _short(text: str, limit: int = 40) -> str:
  """`text` cut to `limit` characters for an error message."""
  if len(text) <= limit:
    return text
  return f"{text[:limit]}... ({len(text)} chars)"


def final_number(answer_text: str) -> str:
  """The canonical final number of a GSM8K answer ("... #### 1,234" -> "1234").

  Raises:
    ValueError: `answer_text` has no `####`, no number after it, or a number
      of more than `MAX_DIGITS` digits.
  """
  if MARKER not in answer_text:
    raise ValueError(f"answer has no {MARKER!r}: {_short(answer_text)!r}")
  number, why = _find(answer_text)
  if number is None:
    raise ValueError(f"answer has {why}: {_short(answer_text)!r}")
  if _num_digits(number) > MAX_DIGITS:
    raise ValueError(f"answer's number has more than {MAX_DIGITS} digits")
  return _canonical(number)


def _read(path: str | os.PathLike
          ) -> Iterator[tuple[int, dict[str, str], str]]:
  """(0-based line index, problem, answer text) of each non-blank line."""
  empty = True
  with open(path, "rb") as f:
    for index, raw in enumerate(f):
      if not raw.strip():
        continue
      where = f"{os.fspath(path)}:{index + 1}"
      try:
        line = json.loads(raw.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: malformed JSON: {e}") from None
      if not isinstance(line, dict):
        raise ValueError(f"{where}: expected a JSON object, got "
                         f"{type(line).__name__}")
      for key in ("question", "answer"):
        if not isinstance(line.get(key), str):
          raise ValueError(f"{where}: missing or non-string key {key!r}")
      try:
        answer = final_number(line["answer"])
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
      empty = False
      problem = {"question": line["question"], "answer": answer}
      yield index, problem, line["answer"]
  if empty:
    raise ValueError(f"{os.fspath(path)}: no problems in the file")


def parse_jsonl(path: str | os.PathLike) -> list[dict[str, str]]:
  """The problems of a GSM8K-format JSONL file; blank lines are skipped.

  Returns:
    `[{"question": str, "answer": canonical final number}]` in file order.

  Raises:
    ValueError: naming the file and 1-based line number of a malformed line
      (bad JSON or UTF-8, not an object, a missing key, an answer without
      `####` and a number), or when the file holds no problem.
  """
  return [problem for _, problem, _ in _read(path)]


class Gsm8k(base.Task):
  """GSM8K-format maths problems from a local JSONL file (see module doc).

  Reasons: `PARSE_ERROR` when the completion has no number (or nothing
  numeric after its last `####`), `WRONG_VALUE` for any other wrong answer.

  Args:
    path: the JSONL file of `file_records` (it may also be passed there).
  """

  name = "gsm8k"
  file_backed = True

  def __init__(self, path: str | os.PathLike | None = None):
    self.path = path

  @property
  def config(self) -> dict[str, Any]:
    return {"path": None if self.path is None else os.fspath(self.path)}

  def prompt(self, problem: Mapping[str, Any]) -> str:
    return f"Question: {problem['question']}\nAnswer:"

  def _verify(self, problem: Mapping[str, Any], completion: str
              ) -> base.Reward:
    number, why = _find(completion)
    if number is None:
      return base.fail(base.PARSE_ERROR, why)
    digits = _num_digits(number)
    if digits > MAX_DIGITS:
      return base.fail(base.WRONG_VALUE, f"answer has {digits} digits (more "
                       f"than {MAX_DIGITS})")
    answer = _canonical(number)
    expected = problem["answer"]
    if decimal.Decimal(answer) == decimal.Decimal(expected):
      return base.CORRECT
    return base.fail(base.WRONG_VALUE, f"answer {answer} != {expected}")

  def file_records(self, path: str | os.PathLike | None = None
                   ) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file (`path`, else the task's).

    A record's id is its 0-based line index in the file and its solution the
    file's worked answer text. Raises `ValueError` as `parse_jsonl` does.
    """
    path = self.path if path is None else path
    if path is None:
      raise ValueError("Gsm8k.file_records needs a path (here or in "
                       "Gsm8k(path=...)).")
    for index, problem, answer_text in _read(path):
      yield {"id": index, "prompt": self.prompt(problem),
             "problem": json.dumps(problem, sort_keys=True),
             "solution": answer_text}
