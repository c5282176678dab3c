"""Countdown: reach a target with arithmetic over a few given numbers.

A problem is a list of numbers and a target; a completion is an arithmetic
expression (integers, `+ - * /`, parentheses, spaces) that uses each given
number at most once (a number given twice may be used twice) and evaluates
exactly to the target. Many expressions are correct (`3*7+25`, `25+7*3`,
`(25+3)+...`), which is what makes entropy and pass@k meaningful here.

Prompt and completion, written for a character-level model:

    prompt      "3 7 25>46:"
    completion  "3*7+25"        (then the end-of-sequence token)

Arithmetic is exact (`fractions.Fraction`): intermediate results may be
fractions, only the final value must equal the target. There is no unary
minus. The verifier parses with an explicit stack, so any nesting depth is
handled without recursion, and it checks the numbers used before evaluating,
so a completion can never make it compute with a huge number.

Two task families share the format (for sequential-learning experiments):

* `countdown` (task A): any subset of the numbers, each at most once.
* `countdown_all` (task B): every number exactly once, as in the classic
  "24 game". A model trained on A already writes valid expressions; on B it
  must learn to use all numbers, which rewards a policy that still explores.
"""

import dataclasses
import functools
import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np

from entropo.tasks import base
from entropo.tasks.settings import SettingError

MAX_COMPLETION_CHARS = 1000  # longer completions are a parse error
MAX_LITERAL_DIGITS = 18
_OPS = "+-*/"
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction:
  if op == "+":
    return a + b
  if op == "-":
    return a - b
  if op == "*":
    return a * b
  return a / b  # the caller checks b != 0


def _tokens(text: str) -> list[str | int] | str:
  """Integers and operator/parenthesis characters, or an error message."""
  tokens: list[str | int] = []
  i, n = 0, len(text)
  while i < n:
    c = text[i]
    if c == " ":
      i += 1
    elif c in "0123456789":
      j = i
      while j < n and text[j] in "0123456789":
        j += 1
      if j - i > MAX_LITERAL_DIGITS:
        return f"number at position {i} has more than {MAX_LITERAL_DIGITS} digits"
      tokens.append(int(text[i:j]))
      i = j
    elif c in "+-*/()":
      tokens.append(c)
      i += 1
    else:
      return f"unexpected character {c!r} at position {i}"
  return tokens


def parse(text: str) -> list[str | int] | str:
  """Reverse-Polish form of an expression, or an error message (a str).

  Shunting-yard with an operand/operator state machine: integers, binary
  `+ - * /`, parentheses; no unary operators. Iterative, so the depth of
  nesting is bounded by memory only.
  """
  tokens = _tokens(text)
  if isinstance(tokens, str):
    return tokens
  if not tokens:
    return "empty expression"
  output: list[str | int] = []
  stack: list[str] = []
  expect_operand = True
  for position, token in enumerate(tokens):
    if isinstance(token, int):
      if not expect_operand:
        return f"two numbers in a row at token {position}"
      output.append(token)
      expect_operand = False
    elif token == "(":
      if not expect_operand:
        return f"'(' after an operand at token {position}"
      stack.append(token)
    elif token == ")":
      if expect_operand:
        return f"')' where a number was expected at token {position}"
      while stack and stack[-1] != "(":
        output.append(stack.pop())
      if not stack:
        return f"unbalanced ')' at token {position}"
      stack.pop()
    else:
      if expect_operand:
        return f"operator {token!r} where a number was expected at token " \
               f"{position}"
      while stack and stack[-1] != "(" and _PREC[stack[-1]] >= _PREC[token]:
        output.append(stack.pop())
      stack.append(token)
      expect_operand = True
  if expect_operand:
    return "expression ends with an operator"
  while stack:
    top = stack.pop()
    if top == "(":
      return "unbalanced '('"
    output.append(top)
  return output


def evaluate(rpn: Sequence[str | int]) -> Fraction | None:
  """Exact value of a parsed expression; None on division by zero."""
  values: list[Fraction] = []
  for token in rpn:
    if isinstance(token, int):
      values.append(Fraction(token))
    else:
      b, a = values.pop(), values.pop()
      if token == "/" and b == 0:
        return None
      values.append(_apply(token, a, b))
  return values[0]


def _join(op: str, left: tuple[str, int], right: tuple[str, int]) -> str:
  """`left op right` with the parentheses the value needs, and no more."""
  (ls, lp), (rs, rp) = left, right
  prec = _PREC[op]
  if lp < prec:
    ls = f"({ls})"
  if rp < prec or (op in "-/" and rp == prec):
    rs = f"({rs})"
  return f"{ls}{op}{rs}"


@functools.lru_cache(maxsize=4096)
def _all_solutions(numbers: tuple[int, ...], target: int, ops: str,
                   use_all: bool) -> tuple[str, ...]:
  """Every distinct expression string that is correct, canonical first.

  Dynamic programming over subsets of the numbers' positions: for each
  subset the expressions it can form, keyed by value. Canonical order is
  (length, string): the shortest, then alphabetical.
  """
  n = len(numbers)
  exprs: dict[int, dict[Fraction, set[tuple[str, int]]]] = {}
  for mask in range(1, 1 << n):
    members = [i for i in range(n) if mask >> i & 1]
    table: dict[Fraction, set[tuple[str, int]]] = {}
    if len(members) == 1:
      table[Fraction(numbers[members[0]])] = {(str(numbers[members[0]]),
                                               _ATOM)}
    else:
      sub = (mask - 1) & mask
      while sub:
        left, right = exprs[sub], exprs[mask ^ sub]
        for (lv, les), (rv, res) in itertools.product(left.items(),
                                                      right.items()):
          for op in ops:
            if op == "/" and rv == 0:
              continue
            value = _apply(op, lv, rv)
            bucket = table.setdefault(value, set())
            for le, re in itertools.product(les, res):
              bucket.add((_join(op, le, re), _PREC[op]))
        sub = (sub - 1) & mask
    exprs[mask] = table
  masks = [(1 << n) - 1] if use_all else range(1, 1 << n)
  found = {s for m in masks for s, _ in exprs[m].get(Fraction(target), ())}
  return tuple(sorted(found, key=lambda s: (len(s), s)))


@dataclasses.dataclass(frozen=True)
class Countdown(base.Task):
  """Task A: reach the target using each given number at most once.

  Attributes:
    num_count: numbers per problem.
    min_value, max_value: range of the numbers (inclusive).
    max_target: targets are integers in [1, max_target].
    ops: the allowed operators, a subset of "+-*/".
    use_all: every number must be used exactly once (task B).
    min_used: the fewest numbers a generated problem's construction uses,
      so that targets are not reachable by a single number.
  """

  name: ClassVar[str] = "countdown"
  num_count: int = 3
  min_value: int = 1
  max_value: int = 12
  max_target: int = 100
  ops: str = "+-*"
  use_all: bool = False
  min_used: int = 2

  def __post_init__(self):
    # Each check names its setting (SettingError.field): the config's
    # validation reports it as task.settings.<field>.
    if not 1 <= self.num_count <= 6:
      raise SettingError("num_count", f"num_count must be in [1, 6] "
                         f"(solutions are enumerated); got {self.num_count}.")
    if not 0 <= self.min_value <= self.max_value:
      raise SettingError(
          "min_value" if self.min_value < 0 else "max_value",
          f"Need 0 <= min_value <= max_value; got {self.min_value}, "
          f"{self.max_value}.")
    if self.max_value >= 10**MAX_LITERAL_DIGITS:
      raise SettingError("max_value", f"max_value must have at most "
                         f"{MAX_LITERAL_DIGITS} digits; got {self.max_value}.")
    if self.max_target < 1:
      raise SettingError("max_target", f"max_target must be >= 1; got "
                         f"{self.max_target}.")
    if not self.ops or set(self.ops) - set(_OPS) or len(set(self.ops)) != len(
        self.ops):
      raise SettingError("ops", f"ops must be distinct characters of "
                         f"{_OPS!r}; got {self.ops!r}.")
    if not 1 <= self.min_used <= self.num_count:
      raise SettingError("min_used", f"min_used must be in [1, num_count="
                         f"{self.num_count}]; got {self.min_used}.")

  @property
  def config(self) -> dict[str, Any]:
    return {"task": self.name, **dataclasses.asdict(self)}

  def longest_prompt(self) -> str:
    """Every number and the target at their most digits."""
    return self.prompt({"numbers": [self.max_value] * self.num_count,
                        "target": self.max_target})

  def longest_solution(self) -> int:
    """Every number at its most digits, an operator between each two and a
    pair of parentheses around each operation but the outermost."""
    n = self.num_count
    return n * len(str(self.max_value)) + (n - 1) + 2 * max(n - 2, 0)

  def prompt(self, problem: Mapping[str, Any]) -> str:
    numbers = " ".join(str(int(x)) for x in problem["numbers"])
    return f"{numbers}>{int(problem['target'])}:"

  def _verify(self, problem: Mapping[str, Any], completion: str
              ) -> base.Reward:
    if len(completion) > MAX_COMPLETION_CHARS:
      return base.fail(base.PARSE_ERROR, f"completion longer than "
                       f"{MAX_COMPLETION_CHARS} characters")
    rpn = parse(completion.strip())
    if isinstance(rpn, str):
      return base.fail(base.PARSE_ERROR, rpn)
    given = Counter(int(x) for x in problem["numbers"])
    used = Counter(t for t in rpn if isinstance(t, int))
    extra = used - given
    if extra:
      number = min(extra)
      times = "more often than given" if number in given else "not given"
      return base.fail(base.RULE_BROKEN, f"uses {number} {times}")
    if self.use_all and used != given:
      missing = sorted((given - used).elements())
      return base.fail(base.RULE_BROKEN, f"does not use {missing}")
    forbidden = sorted({t for t in rpn if isinstance(t, str)} - set(self.ops))
    if forbidden:
      return base.fail(base.RULE_BROKEN,
                       f"operator {''.join(forbidden)!r} is not allowed")
    value = evaluate(rpn)
    if value is None:
      return base.fail(base.INVALID_VALUE, "division by zero")
    if value != int(problem["target"]):
      return base.fail(base.WRONG_VALUE, f"evaluates to {value}, target "
                       f"{problem['target']}")
    return base.CORRECT

  def generate_problem(self, rng: np.random.Generator) -> dict[str, Any]:
    """Random numbers, and a target built from a random expression of them."""
    for _ in range(10_000):
      numbers = [int(x) for x in rng.integers(
          self.min_value, self.max_value + 1, size=self.num_count)]
      count = self.num_count if self.use_all else int(
          rng.integers(self.min_used, self.num_count + 1))
      chosen = [numbers[i] for i in rng.permutation(self.num_count)[:count]]
      value = self._random_value(chosen, rng)
      if (value is not None and value.denominator == 1
          and 1 <= value <= self.max_target
          and (count == 1 or int(value) not in numbers)):
        return {"numbers": numbers, "target": int(value)}
    raise ValueError(f"Could not generate a problem with {self.config}; "
                     f"widen max_target or the value range.")

  def _random_value(self, leaves: list[int], rng) -> Fraction | None:
    """Value of a random binary expression tree over `leaves` (in order)."""
    if len(leaves) == 1:
      return Fraction(leaves[0])
    split = int(rng.integers(1, len(leaves)))
    left = self._random_value(leaves[:split], rng)
    right = self._random_value(leaves[split:], rng)
    op = self.ops[int(rng.integers(len(self.ops)))]
    if left is None or right is None or (op == "/" and right == 0):
      return None
    return _apply(op, left, right)

  def solutions(self, problem: Mapping[str, Any]) -> list[str]:
    numbers = tuple(sorted(int(x) for x in problem["numbers"]))
    return list(_all_solutions(numbers, int(problem["target"]), self.ops,
                               self.use_all))


@dataclasses.dataclass(frozen=True)
class CountdownAll(Countdown):
  """Task B: the same format, but every number exactly once."""

  name: ClassVar[str] = "countdown_all"
  use_all: bool = True
