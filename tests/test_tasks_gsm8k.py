"""Tests for entropo.tasks.gsm8k: JSONL parsing, answers and the verifier."""

import json

import pytest

from entropo.tasks import base
from entropo.tasks import gsm8k

LINES = [
    {"question": "Tom has 3 apples and buys 4. How many?",
     "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A car costs $1,234. Twice that?",
     "answer": "2 * 1,234 = 2,468\n#### 2,468"},
    {"question": "Warmer by -3 from 0?", "answer": "#### -3"},
    {"question": "Half of 7?", "answer": "7 / 2 = 3.50\n#### 3.50"},
]


def _write(tmp_path, lines, name="data.jsonl"):
  """`lines` (dicts are JSON-encoded, strings written as is) to a file."""
  path = tmp_path / name
  path.write_text("".join(
      (x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
                  encoding="utf-8")
  return path


def _problem(answer):
  return {"question": "q", "answer": answer}


# ------------------------------------------------------------------ parsing


def test_parse_jsonl(tmp_path):
  problems = gsm8k.parse_jsonl(_write(tmp_path, LINES))
  assert problems == [
      {"question": LINES[0]["question"], "answer": "7"},
      {"question": LINES[1]["question"], "answer": "2468"},
      {"question": LINES[2]["question"], "answer": "-3"},
      {"question": LINES[3]["question"], "answer": "3.5"},
  ]


def test_parse_jsonl_skips_blank_lines(tmp_path):
  path = _write(tmp_path, [LINES[0], "", "  ", LINES[1]])
  assert [p["answer"] for p in gsm8k.parse_jsonl(path)] == ["7", "2468"]


@pytest.mark.parametrize("text, expected", [
    ("#### 72", "72"),
    ("work 12 #### 1,234", "1234"),
    ("#### 1,234.50", "1234.5"),
    ("#### $5", "5"),
    ("#### -0", "0"),
    ("#### 0.00", "0"),
    ("#### 007", "7"),
    ("#### 1200", "1200"),
    ("#### -12.340", "-12.34"),
    ("a #### 1 then #### 2", "2"),
])
def test_final_number(text, expected):
  assert gsm8k.final_number(text) == expected


@pytest.mark.parametrize("text", ["72", "#### ", "#### seven", "",
                                  "#### " + "9" * 101])
def test_final_number_rejects(text):
  with pytest.raises(ValueError):
    gsm8k.final_number(text)


@pytest.mark.parametrize("bad, message", [
    ("{not json", "malformed JSON"),
    ('["a list"]', "expected a JSON object"),
    ("null", "expected a JSON object"),
    ({"question": "q"}, "'answer'"),
    ({"answer": "#### 1"}, "'question'"),
    ({"question": "q", "answer": 7}, "'answer'"),
    ({"question": "q", "answer": "no marker 7"}, "no '####'"),
    ({"question": "q", "answer": "#### seven"}, "no number after"),
])
def test_parse_jsonl_errors_name_file_and_line(tmp_path, bad, message):
  path = _write(tmp_path, [LINES[0], "", bad, LINES[1]])
  with pytest.raises(ValueError, match=message) as info:
    gsm8k.parse_jsonl(path)
  assert f"{path}:3:" in str(info.value)


def test_parse_jsonl_bad_utf8(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_bytes(json.dumps(LINES[0]).encode() + b"\n\xff\xfe\n")
  with pytest.raises(ValueError, match=f"{path}:2: malformed JSON"):
    gsm8k.parse_jsonl(path)


def test_parse_jsonl_empty_file(tmp_path):
  with pytest.raises(ValueError, match="no problems"):
    gsm8k.parse_jsonl(_write(tmp_path, ["", ""]))


def test_parse_jsonl_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    gsm8k.parse_jsonl(tmp_path / "absent.jsonl")


# ---------------------------------------------------------------- the task


def test_prompt():
  task = gsm8k.Gsm8k()
  assert task.name == "gsm8k"
  assert task.prompt(_problem("7")) == "Question: q\nAnswer:"


def test_file_records(tmp_path):
  path = _write(tmp_path, [LINES[0], "", LINES[3]])
  task = gsm8k.Gsm8k(path)
  assert task.config == {"path": str(path)}
  records = list(task.file_records())
  assert [r["id"] for r in records] == [0, 2]  # 0-based line indices
  first = records[0]
  assert first["prompt"] == f"Question: {LINES[0]['question']}\nAnswer:"
  assert first["solution"] == LINES[0]["answer"]
  assert json.loads(first["problem"]) == {
      "question": LINES[0]["question"], "answer": "7"}
  # Every reference solution is scored correct.
  for record in records:
    assert task.verify(record["problem"], record["solution"]) == base.CORRECT
  # A path given to file_records overrides the task's.
  other = _write(tmp_path, [LINES[1]], name="other.jsonl")
  assert [r["solution"] for r in task.file_records(other)] == [
      LINES[1]["answer"]]


def test_file_records_needs_a_path():
  with pytest.raises(ValueError, match="needs a path"):
    next(gsm8k.Gsm8k().file_records())


def test_records_are_not_generated():
  with pytest.raises(NotImplementedError, match="files"):
    next(gsm8k.Gsm8k().records(seed=0, num=1))


# ---------------------------------------------------------------- verifier


@pytest.mark.parametrize("answer, completion", [
    ("1234", "The answer is 1,234."),
    ("1234", "1234"),
    ("1234", "So she pays $1,234.00 in total."),
    ("72", "#### 72"),
    ("72", "48 + 24 = 72\n#### 72"),
    ("72", "I think 10, no wait: #### 72 (seventy-two) 13"),
    ("72", "####72"),
    ("-3", "It drops to -3."),
    ("-3", "#### -3"),
    ("-5", "-$5"),
    ("3.5", "3.50"),
    ("3.5", "It is 3.5."),
    ("0", "-0"),
    ("12", "3x4 is 12"),
    ("5", "range 3-5? no: 5"),
    ("2345", "1,2345"),
    ("1234", "1234\x00"),
])
def test_verify_correct(answer, completion):
  assert gsm8k.Gsm8k().verify(_problem(answer), completion) == base.CORRECT


@pytest.mark.parametrize("answer, completion", [
    ("1234", "1233"),
    ("1234", "12,34"),          # not a thousands group: 12 then 34
    ("1234", "#### 1234 ... #### 12"),
    ("1234", "#### 12\n then 1234"),  # the marker wins over the last number
    ("3", "-3"),
    ("-3", "3"),
    ("-3", "10-3"),            # a hyphen after a digit is not a sign
    ("3.5", "3.05"),
    ("1", "1.0000000000000000000000000000001"),  # exact, not float
    ("10000000000000000", "10000000000000001"),
    ("7", "7" * 101),           # over MAX_DIGITS: wrong without converting
    ("7", "#### " + "9" * 100_000),
])
def test_verify_wrong_value(answer, completion):
  reward = gsm8k.Gsm8k().verify(_problem(answer), completion)
  assert reward.reason == base.WRONG_VALUE and reward.score == 0.0
  assert reward.detail and not reward.detail.startswith("verifier error")


def test_verify_huge_number_detail_is_short():
  reward = gsm8k.Gsm8k().verify(_problem("7"), "1" * 100_000)
  assert "100000 digits" in reward.detail and len(reward.detail) < 100


@pytest.mark.parametrize("completion", [
    "", "   \n\t", "seven", "####", "I get 72 ####", "#### ????",
    "\u0667\u0662",        # Arabic-Indic 72: only ASCII digits count
    "\uff17\uff12",        # fullwidth 72
    "-", "$", ".", ",",
])
def test_verify_parse_error(completion):
  reward = gsm8k.Gsm8k().verify(_problem("72"), completion)
  assert reward.reason == base.PARSE_ERROR and reward.score == 0.0


def test_verify_non_string_completion():
  reward = gsm8k.Gsm8k().verify(_problem("72"), None)
  assert reward.reason == base.PARSE_ERROR


def test_verify_accepts_problem_json():
  problem = json.dumps(_problem("72"), sort_keys=True)
  assert gsm8k.Gsm8k().verify(problem, "#### 72") == base.CORRECT
