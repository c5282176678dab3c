"""Fuzz tests of every task verifier: whatever the text, a valid `Reward`.

The properties, for every verifier and every completion:

* `verify` returns a `Reward` (it never raises), 0 <= score <= 1, the reason
  is one of `REASONS` and the score is 1 exactly when the reason is "ok";
* the reason is never `verify`'s fallback for an exception inside
  `_verify` (detail "verifier error ..."), which would be a verifier bug;
* every call is quick (a generous 2 s, also for nesting 100,000 deep).

Then oracles: expressions built from a problem's numbers (countdown) and
numbers written in every accepted style (GSM8K) get the reason an
independent evaluation predicts. Hypothesis is derandomized and keeps no
database, so every run tries the same examples.
"""

import decimal
import json
import operator
import time
from fractions import Fraction

import hypothesis
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from entropo import tasks
from entropo.tasks import base
from entropo.tasks import countdown
from entropo.tasks import gsm8k

FUZZ = hypothesis.settings(max_examples=200, deadline=None,
                           derandomize=True, database=None)
SECONDS = 2.0  # generous bound on one verification

# (task, settings, problem): every verifier, with a problem whose numbers
# allow a division by zero that breaks no rule (3 - 3, and 0).
COUNTDOWN_PROBLEM = {"numbers": [0, 3, 3, 8], "target": 24}
CASES = {
    "gsm8k": ("gsm8k", {}, {"question": "What is 6 * 12?", "answer": "72"}),
    "countdown": ("countdown", {}, COUNTDOWN_PROBLEM),
    "countdown_div": ("countdown", {"ops": "+-*/"}, COUNTDOWN_PROBLEM),
    "countdown_all": ("countdown_all", {}, COUNTDOWN_PROBLEM),
    "countdown_all_div": ("countdown_all", {"ops": "+-*/"},
                          COUNTDOWN_PROBLEM),
}
COUNTDOWN_CASES = [name for name in CASES if name != "gsm8k"]


def _task(name):
  task_name, settings, _ = CASES[name]
  if task_name == "gsm8k":
    return gsm8k.Gsm8k()
  return tasks.get_task(task_name, **settings)


def _check(task, problem, completion):
  """Verifies `completion`, asserts the properties and returns the reward."""
  start = time.perf_counter()
  reward = task.verify(problem, completion)
  seconds = time.perf_counter() - start
  shown = completion if len(completion) < 200 else (
      f"{completion[:100]!r}... ({len(completion)} chars)")
  assert isinstance(reward, base.Reward), shown
  assert 0.0 <= reward.score <= 1.0, (shown, reward)
  assert reward.reason in base.REASONS, (shown, reward)
  assert (reward.score == 1.0) == (reward.reason == base.OK), (shown, reward)
  assert (reward.score == 0.0) == (reward.reason != base.OK), (shown, reward)
  assert not reward.detail.startswith("verifier error"), (shown, reward)
  assert seconds < SECONDS, (shown, seconds)
  # Records store problems as JSON; the verdict is the same.
  assert task.verify(json.dumps(problem), completion) == reward, shown
  return reward


# ------------------------------------------------------- adversarial text

DEEP = ["(" * d + "3" + ")" * d for d in (10_000, 100_000)]
ADVERSARIAL = [
    "", " ", "\n", " \t\n\r ", "\x00", "24\x00", "3*8\x00", "\x00" * 1000,
    "\u0662\u0664", "\uff12\uff14", "3*\uff18", "\U0001d7d0\U0001d7d2",
    "9" * 5000, "#### " + "9" * 5000, "9" * 5000 + "*" + "9" * 5000,
    "3" * 19, "3" * 18, "0" * 5000 + "24", "1" + "0" * 4301,
    "1/0", "8/0", "8/(3-3)", "8/(3-3)*0", "(1-1)", "8/(0*3)", "0/0",
    "8/(3-3)+24", "3*8/(0)",
    *DEEP, "(" * 100_000, ")" * 100_000, "(" * 499 + "24" + ")" * 499,
    "()" * 50_000, "+" * 10_000, "3" + "*" * 10_000 + "8",
    "-" * 100_000 + "1", "3*8" + "+0" * 50_000, "3 " * 50_000,
    "3*8", " 3 * 8 ", "3*8\n", "3*8=24", "24", "####", "#### 24", "#### 72",
    "1e309", "inf", "nan", "-24", "+24", "0x18", "24.0", "1_000", "3**8",
    "3//8", "3%8", "3^8", "(3*8", "3*8)", ")3*8(", "3 8", "*3*8", "3*8*",
    "\ud800", "3*8\udfff", "\u200b24", "2\u00004",
]
_UNICODE_DIGITS = st.text(
    st.characters(categories=["Nd"], exclude_characters="0123456789"),
    min_size=1)
_TOKENS = st.sampled_from(
    ["0", "3", "8", "24", "72", "(", ")", "+", "-", "*", "/", " ", "####",
     ",", ".", "$", "\x00", "\uff13", "99999999999999999999"])
COMPLETIONS = st.one_of(
    st.sampled_from(ADVERSARIAL),
    st.text(),
    st.text(alphabet="0123456789+-*/() ", max_size=60),
    _UNICODE_DIGITS,
    st.lists(_TOKENS, max_size=40).map("".join),
    st.builds(lambda n, op: "1" + op * n + "1", st.integers(0, 20_000),
              st.sampled_from("+-*/( ")),
    st.builds(lambda n, tail: "9" * n + tail, st.integers(1000, 6000),
              st.sampled_from(["", "*9", ".", ",000"])),
    st.builds(lambda d: "(" * d + "3*8" + ")" * d, st.integers(0, 2000)),
)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("completion", ADVERSARIAL,
                         ids=range(len(ADVERSARIAL)))
def test_adversarial(name, completion):
  _check(_task(name), CASES[name][2], completion)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("completion", DEEP, ids=["10k", "100k"])
def test_deep_nesting_is_a_quick_failure(name, completion):
  reward = _check(_task(name), CASES[name][2], completion)
  assert reward.reason != base.OK


def test_countdown_parse_any_depth():
  # The parser itself is iterative, not only shielded by the length cap.
  rpn = countdown.parse("(" * 100_000 + "3*8" + ")" * 100_000)
  assert countdown.evaluate(rpn) == 24


@pytest.mark.parametrize("name", CASES)
@FUZZ
@given(completion=COMPLETIONS)
def test_any_completion(name, completion):
  _check(_task(name), CASES[name][2], completion)


@pytest.mark.parametrize("name", CASES)
def test_non_string_completion(name):
  for completion in (None, 24, b"24", ["24"]):
    reward = _task(name).verify(CASES[name][2], completion)
    assert reward.reason == base.PARSE_ERROR


@pytest.mark.parametrize("name", CASES)
@FUZZ
@given(completion=_UNICODE_DIGITS)
def test_only_ascii_digits_count(name, completion):
  reward = _check(_task(name), CASES[name][2], completion)
  assert reward.reason == base.PARSE_ERROR


# ---------------------------------------------------------------- countdown

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul,
          "/": operator.truediv}


@st.composite
def _expression(draw, leaves):
  """(text, exact value or None on a division by zero, precedence).

  A random binary tree over `leaves` in order, written with the fewest
  parentheses its value needs, sometimes more, and random spaces.
  """
  if len(leaves) == 1:
    text, value, prec = str(leaves[0]), Fraction(leaves[0]), 3
  else:
    split = draw(st.integers(1, len(leaves) - 1))
    left, lvalue, lprec = draw(_expression(leaves[:split]))
    right, rvalue, rprec = draw(_expression(leaves[split:]))
    op = draw(st.sampled_from("+-*/"))
    prec = _PREC[op]
    if lprec < prec:
      left = f"({left})"
    if rprec < prec or (op in "-/" and rprec == prec):
      right = f"({right})"
    space = draw(st.sampled_from(["", " "]))
    text = f"{left}{space}{op}{space}{right}"
    if lvalue is None or rvalue is None or (op == "/" and rvalue == 0):
      value = None
    else:
      value = _APPLY[op](lvalue, rvalue)
  if draw(st.integers(0, 4)) == 0:
    text, prec = f"({text})", 3
  return text, value, prec


@pytest.mark.parametrize("name", COUNTDOWN_CASES)
@FUZZ
@given(data=st.data())
def test_countdown_expressions_of_the_numbers(name, data):
  """Expressions over (a subset of) the numbers: the reason is predicted."""
  task = _task(name)
  numbers = data.draw(st.lists(st.integers(0, 30), min_size=1, max_size=5),
                      label="numbers")
  count = data.draw(st.integers(1, len(numbers)), label="count")
  leaves = data.draw(st.permutations(numbers), label="order")[:count]
  text, value, _ = data.draw(_expression(leaves), label="expression")
  if value is not None and value.denominator == 1 and data.draw(
      st.booleans(), label="hit"):
    target = int(value)
  else:
    target = data.draw(st.integers(-1000, 1000).filter(lambda t: t != value),
                       label="target")
  problem = {"numbers": numbers, "target": target}
  reward = _check(task, problem, text)
  # Every broken rule is an acceptable reason; the verifier reports one.
  broken = set()
  if task.use_all and count < len(numbers):
    broken.add(base.RULE_BROKEN)
  if set(text) & set("+-*/") - set(task.ops):
    broken.add(base.RULE_BROKEN)
  if value is None:
    broken.add(base.INVALID_VALUE)
  if broken:
    assert reward.reason in broken, (text, problem, reward)
  else:
    expected = base.OK if value == target else base.WRONG_VALUE
    assert reward.reason == expected, (text, problem, reward)


@pytest.mark.parametrize("name", COUNTDOWN_CASES)
@FUZZ
@given(data=st.data())
def test_countdown_numbers_not_given(name, data):
  """Using a number not given, or one more often, breaks a rule."""
  task = _task(name)
  numbers = data.draw(st.lists(st.integers(0, 30), min_size=1, max_size=4))
  extra = data.draw(st.integers(0, 10**18 - 1))
  leaves = data.draw(st.permutations(numbers + [extra]))
  text, _, _ = data.draw(_expression(leaves))
  reward = _check(task, {"numbers": numbers, "target": 24}, text)
  # Numbers are checked before evaluating: not INVALID_VALUE either.
  assert reward.reason == base.RULE_BROKEN, (text, reward)


@pytest.mark.parametrize("name", COUNTDOWN_CASES)
@FUZZ
@given(seed=st.integers(0, 2**32 - 1), data=st.data())
def test_countdown_solutions_and_their_mutations(name, seed, data):
  """Generated problems: every listed solution is correct; an edited one
  still gets a valid reward."""
  task = _task(name)
  problem = task.generate_problem(np.random.default_rng(seed))
  solutions = task.solutions(problem)
  assert solutions
  for solution in solutions[:20]:
    assert _check(task, problem, solution) == base.CORRECT, solution
  solution = data.draw(st.sampled_from(solutions))
  at = data.draw(st.integers(0, len(solution)))
  insert = data.draw(st.one_of(_TOKENS, st.text(max_size=3)))
  _check(task, problem, solution[:at] + insert + solution[at:])


# ------------------------------------------------------------------- gsm8k

_GSM8K_TEMPLATES = ["{}", "The answer is {}.", "#### {}", "####{}\n",
                    "12 + 30 = 42, so she has {} left.", "So {} dollars"]


@st.composite
def _decimal(draw):
  """A decimal with up to 40 integer and 4 fraction digits."""
  digits = draw(st.integers(-10**40, 10**40))
  places = draw(st.integers(0, 4))
  return decimal.Decimal(f"{digits}e-{places}")


def _written(value, commas, dollar):
  """`value` in GSM8K style: optional thousands commas and `$`."""
  text = format(value, ",f" if commas else "f")
  if dollar:
    text = text.replace("-", "-$") if text.startswith("-") else "$" + text
  return text


@FUZZ
@given(value=_decimal(), commas=st.booleans(), dollar=st.booleans(),
       template=st.sampled_from(_GSM8K_TEMPLATES), off=st.booleans())
def test_gsm8k_numbers_in_any_style(value, commas, dollar, template, off):
  """A number in any accepted style scores by its exact value."""
  reference = format(value, "f")
  written = value + decimal.Decimal("0.0001") if off else value
  completion = template.format(_written(written, commas, dollar))
  reward = _check(gsm8k.Gsm8k(), {"question": "q", "answer": reference},
                  completion)
  expected = base.WRONG_VALUE if off else base.OK
  assert reward.reason == expected, (completion, reference, reward)


@FUZZ
@given(completion=st.text(
    st.characters(exclude_characters="0123456789")))
def test_gsm8k_text_without_digits_is_a_parse_error(completion):
  reward = _check(gsm8k.Gsm8k(), CASES["gsm8k"][2], completion)
  assert reward.reason == base.PARSE_ERROR


@FUZZ
@given(prefix=st.text(), suffix=st.text(st.characters(exclude_characters="#")),
       n=st.integers(101, 5000))
def test_gsm8k_too_many_digits_is_wrong(prefix, suffix, n):
  """The answer after `####` is longer than `MAX_DIGITS` whatever follows."""
  completion = f"{prefix} #### {'7' * n}{suffix}"
  reward = _check(gsm8k.Gsm8k(), CASES["gsm8k"][2], completion)
  assert reward.reason == base.WRONG_VALUE, (completion[:50], reward)
