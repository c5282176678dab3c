"""apps_world: a tiny AppWorld-shaped world of apps with a Python API.

A generated state (the user `me`, a few people with wallet balances, the
debts `me` owes, the contacts' phone numbers) lives in the parent process;
the agent's code calls it through functions in the sandbox that forward to
the parent (`_rpc`), so code can only change the world through the API,
never forge it. A task is stated in words; the episode ends when the agent
writes `done` (or runs out of turns). The reward is computed from checks on
the final state, and a sparse success (`SOLVED`) when all pass. The reward
(`final_reward`, whatever the reason the episode ended) pays progress
(`progress`): of the checks that fail on the starting state (the work to
do), the fraction that pass at the end, where a check that held at the
start and fails at the end (as in AppWorld, "nothing else changed", so
stray payments) counts as one more to do; halved when the agent did not
say `done` (without that, a policy learns to stop saying it: a truncated
episode with the right state got full reward). An episode that changed
nothing, or crashed and said `done`, gets 0: the reward of the fraction
of all checks paid it 0.375-0.5 for the checks that already held
(docs/sandbox.md).

The API in the sandbox:

    bal()              my balance            owe("bob")   what I owe bob
    pay("bob", 7)      pay bob 7             debts()      whom I owe
    phone("bob")       bob's number          add("dan", "5550123")  a contact

Task kinds (`kinds`), with a canonical episode:

    pay      "pay bob 7"        run: pay("bob",7) / ok / done
    payback  "pay back bob"     run: owe("bob") / 7 / run: pay("bob",7) / ok /
                                done
    payall   "pay all debts"    run: for n in debts(): pay(n,owe(n)) / ok / done
    half     "give bob half"    run: pay("bob",bal()//2) / ok / done
    add      "add dan 5550123"  run: add("dan","5550123") / ok / done
"""

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from entropo.tasks import code_env
from entropo.tasks import environment as env_lib
from entropo.tasks import sandbox as sandbox_lib
from entropo.tasks.settings import SettingError

NAMES = ("ann", "bob", "cy", "dan", "eve", "fay", "gus", "hal")
KINDS = ("pay", "payback", "payall", "half", "add")
ME = "me"
SETUP = """\
def bal(): return _rpc("bal")
def pay(name, amount): _rpc("pay", name, amount)
def owe(name): return _rpc("owe", name)
def debts(): return _rpc("debts")
def phone(name): return _rpc("phone", name)
def add(name, number): _rpc("add", name, number)
"""


class World:
  """The apps' state and API (runs in the parent, on trusted data)."""

  def __init__(self, state: Mapping[str, Any]):
    self.state = copy.deepcopy(dict(state))
    self.state["payments"] = []

  def __call__(self, name: str, args: list, kwargs: dict) -> Any:
    """Answers an `_rpc` call from the sandbox."""
    api = {"bal": self.bal, "pay": self.pay, "owe": self.owe,
           "debts": self.debts, "phone": self.phone, "add": self.add}
    if name not in api:
      raise ValueError(f"no API {name!r}")
    return api[name](*args, **kwargs)

  def _person(self, name) -> str:
    if not isinstance(name, str) or name not in self.state["balance"]:
      raise ValueError(f"no person {name!r}")
    return name

  def bal(self) -> int:
    return self.state["balance"][ME]

  def pay(self, name, amount) -> None:
    name = self._person(name)
    if name == ME:
      raise ValueError("paying me")
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
      raise ValueError("bad amount")
    if amount > self.state["balance"][ME]:
      raise ValueError("no money")
    self.state["balance"][ME] -= amount
    self.state["balance"][name] += amount
    debt = self.state["owe"].get(name, 0)
    if debt:
      self.state["owe"][name] = max(debt - amount, 0)
    self.state["payments"].append([name, amount])

  def owe(self, name) -> int:
    return self.state["owe"].get(self._person(name), 0)

  def debts(self) -> list[str]:
    return sorted(n for n, v in self.state["owe"].items() if v > 0)

  def phone(self, name) -> str:
    if name not in self.state["phone"]:
      raise ValueError(f"no contact {name!r}")
    return self.state["phone"][name]

  def add(self, name, number) -> None:
    if not isinstance(name, str) or not isinstance(number, str) or not (
        0 < len(name) <= 16 and 0 < len(number) <= 16):
      raise ValueError("bad contact")
    self.state["phone"][name] = number


def checks(problem: Mapping[str, Any], final: Mapping[str, Any]
           ) -> list[tuple[str, bool]]:
  """(description, passed) of every check of the task on the final state."""
  start, kind = problem["state"], problem["kind"]
  expected = copy.deepcopy(start["balance"])
  owe = dict(start["owe"])
  payments = []
  target = problem.get("name")
  if kind == "pay":
    payments = [[target, problem["amount"]]]
  elif kind == "payback":
    payments = [[target, owe[target]]]
  elif kind == "payall":
    payments = [[n, owe[n]] for n in sorted(owe) if owe[n] > 0]
  elif kind == "half":
    payments = [[target, start["balance"][ME] // 2]]
  for name, amount in payments:
    expected[ME] -= amount
    expected[name] += amount
    if name in owe:
      owe[name] = max(owe[name] - amount, 0)
  got = final["balance"]
  result = [(f"{n} has {expected[n]}", got.get(n) == expected[n])
            for n in sorted(expected)]
  if kind == "add":
    result.append((f"{target} is a contact",
                   final["phone"].get(target) == problem["number"]))
  else:
    result.append(("payments as asked", sorted(map(list, final["payments"]))
                   == sorted(payments)))
  result.append(("debts as expected", final["owe"] == owe))
  others = {k: v for k, v in final["phone"].items() if k != target}
  start_others = {k: v for k, v in start["phone"].items() if k != target}
  result.append(("other contacts unchanged", others == start_others))
  return result


def progress(problem: Mapping[str, Any], final: Mapping[str, Any]) -> float:
  """The reward for the state `final`: the checks still to do on the
  starting state that pass on `final`, over those to do plus the checks
  that held at the start and fail on `final` (broken ones). 0 for an
  untouched state, 1 exactly when every check passes."""
  start = problem["state"]
  initial = [ok for _, ok in checks(problem, {**start, "payments": []})]
  end = [ok for _, ok in checks(problem, final)]
  todo = sum(not ok for ok in initial)
  done = sum(ok for was, ok in zip(initial, end) if not was)
  broken = sum(not ok for was, ok in zip(initial, end) if was)
  if todo + broken == 0:
    return 1.0
  return done / (todo + broken)


class AppsEnvironment(code_env.CodeEnvironment):
  """One apps_world episode; the world lives in this (parent) object."""

  def __init__(self, task: "AppsWorld"):
    limits = sandbox_lib.Limits(wall_seconds=task.wall_seconds)
    super().__init__(code_env.local_sandbox(limits),
                     observation_chars=task.observation_chars,
                     setup_code=SETUP, prestart=True)
    self.task = task
    self.problem = None
    self.world = None

  def reset(self, problem):
    self.start()
    self.problem = env_lib.problem_dict(problem)
    self.world = World(self.problem["state"])
    self.api = self.world
    return self.task.prompt(self.problem)

  def score(self, finished: bool = True) -> float:
    """`progress` of the current state, halved unless the agent `finished`
    (said `done`)."""
    return progress(self.problem, self.world.state) * (1 + finished) / 2

  def act(self, kind, payload):
    if kind != code_env.DONE:
      return super().act(kind, payload)
    solved = self.score() == 1.0
    return env_lib.Turn(
        done=True, reason=env_lib.SOLVED if solved else env_lib.FAILED,
        info={"status": "done"})

  def final_reward(self, reason):
    # The episode ended with `done` exactly when the environment named it.
    return self.score(finished=reason in (env_lib.SOLVED, env_lib.FAILED))


@dataclasses.dataclass(frozen=True)
class AppsWorld(env_lib.AgentTask):
  """Tasks over a generated world of wallets, debts and contacts.

  Attributes:
    num_people: people besides `me` (2 to len(NAMES) - 1).
    max_amount: the largest balance and debt of a generated state.
    kinds: task kinds to draw from (a subset of `KINDS`).
    max_turns: actions per episode.
    wall_seconds: the sandbox's wall limit per run.
    observation_chars: the longest observation.
  """

  name: ClassVar[str] = "apps_world"
  # Each episode starts a sandbox: 512 at once ran a third of their first
  # steps past a 10 s limit on 2 cores (docs/sandbox.md).
  max_concurrent_episodes: ClassVar[int] = 64
  stop: ClassVar[tuple[str, ...]] = ("\n",)
  num_people: int = 3
  max_amount: int = 20
  kinds: tuple[str, ...] = KINDS
  max_turns: int = 4
  wall_seconds: float = 2.0
  observation_chars: int = 32

  def __post_init__(self):
    if not 2 <= self.num_people < len(NAMES):
      raise SettingError("num_people", f"num_people must be in "
                         f"[2, {len(NAMES) - 1}]; got {self.num_people}.")
    if self.max_amount < 2:
      raise SettingError("max_amount", f"max_amount must be >= 2; got "
                         f"{self.max_amount}.")
    object.__setattr__(self, "kinds", tuple(self.kinds))
    if not self.kinds or set(self.kinds) - set(KINDS):
      raise SettingError("kinds", f"kinds must be a non-empty subset of "
                         f"{KINDS}; got {self.kinds}.")
    if self.max_turns < 2:
      raise SettingError("max_turns", f"max_turns must be >= 2; got "
                         f"{self.max_turns}.")
    code_env.check_limits(self)

  def environment(self) -> AppsEnvironment:
    return AppsEnvironment(self)

  def generate_problem(self, rng: np.random.Generator) -> dict[str, Any]:
    people = sorted(str(n) for n in rng.choice(NAMES, self.num_people,
                                               replace=False))
    top = self.max_amount
    balance = {n: int(rng.integers(0, top + 1)) for n in people}
    owe = {n: int(rng.integers(1, top // 2 + 1)) for n in people[:2]}
    balance[ME] = int(rng.integers(sum(owe.values()) + top // 2 + 1,
                                   3 * top + 1))
    phone = {n: f"555{int(rng.integers(1000, 10000))}" for n in people[1:]}
    state = {"balance": balance, "owe": owe, "phone": phone}
    kind = self.kinds[int(rng.integers(len(self.kinds)))]
    problem = {"kind": kind, "state": state}
    if kind == "pay":
      problem["name"] = people[int(rng.integers(len(people)))]
      problem["amount"] = int(rng.integers(1, top // 2 + 1))
    elif kind in ("payback", "half"):
      pool = sorted(owe) if kind == "payback" else people
      problem["name"] = pool[int(rng.integers(len(pool)))]
    elif kind == "add":
      problem["name"] = people[0]
      problem["number"] = f"555{int(rng.integers(1000, 10000))}"
    return problem

  def prompt(self, problem: Mapping[str, Any]) -> str:
    kind, name = problem["kind"], problem.get("name")
    text = {"pay": lambda: f"pay {name} {problem.get('amount')}",
            "payback": lambda: f"pay back {name}",
            "payall": lambda: "pay all debts",
            "half": lambda: f"give {name} half my money",
            "add": lambda: f"add {name} {problem.get('number')}"}[kind]()
    return f"task: {text}\n"

  def transcripts(self, problem: Mapping[str, Any]
                  ) -> list[list[env_lib.Segment]]:
    """Scripted correct episodes, canonical first."""
    kind, name = problem["kind"], problem.get("name")
    seg = env_lib.Segment
    ok, done = seg("ok\n", False), seg("done\n", True)

    def one(code):
      return [seg(f"run: {code}\n", True), ok, done]

    if kind == "pay":
      return [one(f'pay("{name}",{problem["amount"]})')]
    if kind == "payback":
      debt = problem["state"]["owe"][name]
      return [[seg(f'run: owe("{name}")\n', True), seg(f"{debt}\n", False),
               seg(f'run: pay("{name}",{debt})\n', True), ok, done],
              one(f'pay("{name}",owe("{name}"))')]
    if kind == "payall":
      return [one("for n in debts(): pay(n,owe(n))")]
    if kind == "half":
      return [one(f'pay("{name}",bal()//2)')]
    return [one(f'add("{name}","{problem["number"]}")')]
