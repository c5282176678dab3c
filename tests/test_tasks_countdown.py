"""Countdown tasks, warm-start data and the character tokenizer."""

import itertools
import json
import re
from fractions import Fraction

import numpy as np
import pytest

from entropo.models import load_tokenizer
from entropo.tasks import base
from entropo.tasks import countdown
from entropo.tasks import char_tokenizer
from entropo.tasks import get_task
from entropo.tasks import save_tokenizer
from entropo.tasks import warm_start_examples

CONFIGS = [
    ("countdown", {}),
    ("countdown", {"num_count": 4, "max_value": 25, "ops": "+-*/"}),
    ("countdown", {"num_count": 2, "min_used": 2}),
    ("countdown_all", {}),
    ("countdown_all", {"num_count": 4, "ops": "+-*/", "max_target": 50}),
]
PROBLEM = {"numbers": [3, 7, 25], "target": 46}


def _python_value(expression: str):
  """Python's own evaluation of an expression over exact fractions."""
  code = re.sub(r"\d+", lambda m: f"Fraction({m.group()})", expression)
  try:
    return eval(code, {"Fraction": Fraction})  # pylint: disable=eval-used
  except ZeroDivisionError:
    return None


@pytest.mark.parametrize("completion,reason", [
    ("3*7+25", base.OK),
    ("25+7*3", base.OK),
    (" ( (3) ) * 7 + 25 ", base.OK),
    ("21+25", base.RULE_BROKEN),  # 21 is not given
    ("3*7+25+3", base.RULE_BROKEN),  # 3 twice
    ("25-7*3", base.WRONG_VALUE),  # 4
    ("25/(7-7)", base.RULE_BROKEN),  # 7 twice (checked before evaluating)
    ("", base.PARSE_ERROR),
    ("3 7", base.PARSE_ERROR),
    ("-3+7", base.PARSE_ERROR),
    ("(3*7+25", base.PARSE_ERROR),
    ("3*7+25)", base.PARSE_ERROR),
    ("3*7+", base.PARSE_ERROR),
    ("3×7+25", base.PARSE_ERROR),
    ("3*7+25=46", base.PARSE_ERROR),
    ("٣*7+25", base.PARSE_ERROR),  # Arabic-Indic digit
])
def test_hand_computed_verdicts(completion, reason):
  reward = get_task("countdown").verify(PROBLEM, completion)
  assert reward.reason == reason, reward
  assert reward.score == (1.0 if reason == base.OK else 0.0)
  assert (reward.detail == "") == (reason == base.OK)


def test_division_by_zero_and_forbidden_operator():
  task = get_task("countdown", ops="+-*/")
  problem = {"numbers": [3, 7, 7], "target": 5}
  assert task.verify(problem, "3/(7-7)").reason == base.INVALID_VALUE
  assert task.verify(problem, "7-7/3").reason == base.WRONG_VALUE
  no_div = get_task("countdown")
  assert no_div.verify(problem, "7/7+3").reason == base.RULE_BROKEN
  # Fractions in between are exact: (7/3)*3 is 7, not 6.999...
  assert task.verify({"numbers": [7, 3, 3], "target": 7}, "7/3*3").correct


def test_use_all_rule():
  task_b = get_task("countdown_all")
  assert task_b.verify(PROBLEM, "3*7+25").correct
  reward = task_b.verify({"numbers": [3, 7, 25], "target": 21}, "3*7")
  assert reward.reason == base.RULE_BROKEN and "25" in reward.detail
  assert get_task("countdown").verify({"numbers": [3, 7, 25], "target": 21},
                                      "3*7").correct


def test_problem_as_json_and_non_string_completion():
  task = get_task("countdown")
  assert task.verify(json.dumps(PROBLEM), "3*7+25").correct
  assert task.verify(PROBLEM, None).reason == base.PARSE_ERROR
  assert task.verify(PROBLEM, b"3*7+25").reason == base.PARSE_ERROR


@pytest.mark.parametrize("depth", [1, 1000, 200_000])
def test_deep_nesting(depth):
  task = get_task("countdown", max_value=100)
  text = "(" * depth + "3*7" + ")" * depth + "+25"
  expected = base.OK if len(text) <= countdown.MAX_COMPLETION_CHARS else (
      base.PARSE_ERROR)
  assert task.verify(PROBLEM, text).reason == expected
  rpn = countdown.parse(text)  # the parser itself has no depth limit
  assert countdown.evaluate(rpn) == 46


def test_huge_numbers_and_long_input():
  task = get_task("countdown")
  assert task.verify(PROBLEM, "9" * 5000).reason == base.PARSE_ERROR
  assert task.verify(PROBLEM, "9" * 19).reason == base.PARSE_ERROR
  assert task.verify(PROBLEM, "9" * 18).reason == base.RULE_BROKEN
  assert task.verify(PROBLEM, "3*7+25" + " " * 10**6).reason == (
      base.PARSE_ERROR)


def test_parser_matches_python_on_random_expressions():
  """An independent reference: Python's grammar over exact fractions."""
  rng = np.random.default_rng(0)

  def random_expression(depth):
    if depth == 0 or rng.random() < 0.3:
      return str(int(rng.integers(0, 12)))
    left, right = random_expression(depth - 1), random_expression(depth - 1)
    op = "+-*/"[int(rng.integers(4))]
    text = f"{left}{op}{right}"
    return f"({text})" if rng.random() < 0.4 else text

  for _ in range(500):
    text = random_expression(4)
    rpn = countdown.parse(text)
    assert not isinstance(rpn, str), (text, rpn)
    assert countdown.evaluate(rpn) == _python_value(text), text


@pytest.mark.parametrize("name,settings", CONFIGS)
def test_generated_problems_are_solvable(name, settings):
  task = get_task(name, **settings)
  for record in task.records(seed=3, num=40):
    problem = json.loads(record["problem"])
    assert record["prompt"] == task.prompt(problem)
    assert len(problem["numbers"]) == task.num_count
    assert 1 <= problem["target"] <= task.max_target
    assert all(task.min_value <= x <= task.max_value
               for x in problem["numbers"])
    solutions = task.solutions(problem)
    assert solutions and record["solution"] == solutions[0]
    assert len(set(solutions)) == len(solutions)
    assert [len(s) for s in solutions] == sorted(len(s) for s in solutions)
    for solution in solutions:
      assert task.verify(problem, solution).correct, (problem, solution)
      assert _python_value(solution) == problem["target"]


def _brute_force_values(numbers, ops, use_all):
  """Values reachable by fully parenthesised expressions (a reference)."""
  def values(leaves):
    if len(leaves) == 1:
      return {Fraction(leaves[0])}
    out = set()
    for split in range(1, len(leaves)):
      for a, b in itertools.product(values(leaves[:split]),
                                    values(leaves[split:])):
        for op in ops:
          if op == "/" and b == 0:
            continue
          out.add({"+": a + b, "-": a - b, "*": a * b,
                   "/": a / b if b else None}[op])
    return out
  sizes = [len(numbers)] if use_all else range(1, len(numbers) + 1)
  reachable = set()
  for k in sizes:
    for perm in itertools.permutations(numbers, k):
      reachable |= values(list(perm))
  return reachable


@pytest.mark.parametrize("use_all", [False, True])
def test_solvable_exactly_when_brute_force_reaches_the_target(use_all):
  rng = np.random.default_rng(1)
  task = get_task("countdown", ops="+-*/", use_all=use_all)
  for _ in range(30):
    numbers = [int(x) for x in rng.integers(1, 10, size=3)]
    reachable = _brute_force_values(numbers, "+-*/", use_all)
    for target in range(1, 40):
      solutions = task.solutions({"numbers": numbers, "target": target})
      assert bool(solutions) == (target in reachable), (numbers, target)


def test_generation_is_deterministic_and_seeded():
  task = get_task("countdown")
  first = list(task.records(seed=7, num=30))
  assert first == list(task.records(seed=7, num=30))
  assert first[10:] == list(task.records(seed=7, num=20, start=10))
  assert first != list(task.records(seed=8, num=30))
  assert [r["id"] for r in first] == list(range(30))


@pytest.mark.parametrize("settings,match", [
    ({"num_count": 0}, "num_count"),
    ({"ops": "+^"}, "ops"),
    ({"ops": "++"}, "ops"),
    ({"min_value": 5, "max_value": 2}, "min_value"),
    ({"min_used": 4}, "min_used"),
    ({"max_target": 0}, "max_target"),
    ({"colour": "red"}, "colour"),
])
def test_bad_settings(settings, match):
  with pytest.raises(ValueError, match=match):
    get_task("countdown", **settings)


def test_unknown_task():
  with pytest.raises(ValueError, match="countdown"):
    get_task("sudoku")


def test_impossible_generation_is_an_error():
  task = get_task("countdown", min_value=1, max_value=1, max_target=1,
                  ops="*")
  with pytest.raises(ValueError, match="Could not generate"):
    task.generate_problem(np.random.default_rng(0))


def test_warm_start_spread():
  task = get_task("countdown", num_count=4, max_value=20)
  kwargs = dict(seed=11, num_problems=25, samples_per_problem=12)
  narrow = warm_start_examples(task, spread=0.0, **kwargs)
  wide = warm_start_examples(task, spread=1.0, **kwargs)
  assert wide == warm_start_examples(task, spread=1.0, **kwargs)
  records = {r["prompt"]: json.loads(r["problem"])
             for r in task.records(11, 25)}
  for prompt, completion in narrow + wide:
    assert task.verify(records[prompt], completion).correct
  forms = lambda pairs: len(set(pairs))  # noqa: E731
  assert forms(narrow) == 25  # one canonical completion per problem
  assert forms(wide) > 2 * forms(narrow)
  mid = warm_start_examples(task, spread=0.5, **kwargs)
  canonical = {p: task.solutions(records[p])[0] for p in records}
  share = np.mean([c == canonical[p] for p, c in mid])
  assert 0.5 < share < 0.9  # 0.5 + 0.5 / (number of solutions)
  with pytest.raises(ValueError, match="spread"):
    warm_start_examples(task, spread=1.5, **kwargs)


def test_char_tokenizer_round_trip(tmp_path):
  tok = char_tokenizer()
  text = "12 5 3>17:12+5\nQuestion: what's (3*7)+25? #### 46"
  ids = tok.encode(text)
  assert len(ids) == len(text)
  assert tok.decode(ids) == text
  assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
  assert tok.encode("é")[0] == tok.token_to_id("<unk>")
  loaded = load_tokenizer(save_tokenizer(tok, tmp_path / "tok"))
  assert (tmp_path / "tok" / "tokenizer.json").is_file()
  assert loaded.encode(text) == ids
  assert (loaded.eos_id, loaded.pad_id) == (tok.eos_id, tok.pad_id)
  assert loaded.vocab_size == tok.vocab_size == 3 + 96
  with pytest.raises(ValueError, match="repeats"):
    char_tokenizer("aa")
