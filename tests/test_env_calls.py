"""The bounded pool of environment calls (entropo.training.env_calls).

* Each call's time limit starts when the call starts running: a batch
  larger than the pool does not time out its later calls.
* A hung call times out after its own limit and gives its place to the
  next call; the others complete and the batch's wall time stays bounded.
* At most `workers` calls run at once; results keep their order and the
  `("ok" | "error" | "timeout", value)` contract.
"""

import threading
import time

import pytest

from entropo.training import env_calls
from entropo.training import episodes as episodes_lib


def _sleeper(seconds: float, value):
  def call():
    time.sleep(seconds)
    return value
  return call


def test_results_in_order_with_errors_and_a_timeout():
  t0 = time.perf_counter()
  out = env_calls.call_all([lambda: 1, _sleeper(5, None), lambda: 1 / 0],
                           timeout=0.5)
  assert time.perf_counter() - t0 < 2
  assert out[0] == ("ok", 1) and out[1] == ("timeout", None)
  assert out[2][0] == "error" and isinstance(out[2][1], ZeroDivisionError)


def test_limit_starts_when_the_call_starts():
  """6 calls of 0.3 s on 2 places with a 0.5 s limit: none times out (a
  deadline shared from submission would end the last four)."""
  t0 = time.perf_counter()
  out = env_calls.call_all([_sleeper(0.3, i) for i in range(6)],
                           timeout=0.5, workers=2)
  took = time.perf_counter() - t0
  assert out == [("ok", i) for i in range(6)]
  assert 0.85 < took < 1.8, took  # three rounds of 0.3 s


def test_hung_calls_give_back_their_places():
  """Two hung calls on a pool of 2 are abandoned at their own limit; the
  quick calls behind them then run and complete."""
  calls = [_sleeper(30, "hung"), _sleeper(30, "hung")] + [
      _sleeper(0.05, i) for i in range(4)]
  t0 = time.perf_counter()
  out = env_calls.call_all(calls, timeout=0.5, workers=2)
  took = time.perf_counter() - t0
  assert out[:2] == [("timeout", None)] * 2
  assert out[2:] == [("ok", i) for i in range(4)]
  assert 0.5 <= took < 1.5, took


def test_a_hung_call_holds_back_only_itself():
  calls = [_sleeper(30, "hung")] + [_sleeper(0.1, i) for i in range(4)]
  t0 = time.perf_counter()
  out = env_calls.call_all(calls, timeout=0.6, workers=2)
  took = time.perf_counter() - t0
  assert out == [("timeout", None)] + [("ok", i) for i in range(4)]
  assert took < 1.4, took  # the hung call's limit, not 30 s


def test_at_most_workers_calls_run_at_once():
  lock = threading.Lock()
  now, peak = [0], [0]

  def call(i):
    with lock:
      now[0] += 1
      peak[0] = max(peak[0], now[0])
    time.sleep(0.02)
    with lock:
      now[0] -= 1
    if i % 5 == 4:
      raise ValueError(i)
    return i

  out = env_calls.call_all([lambda i=i: call(i) for i in range(30)],
                           timeout=2.0, workers=3)
  assert peak[0] == 3
  for i, (status, value) in enumerate(out):
    if i % 5 == 4:
      assert status == "error" and value.args == (i,)
    else:
      assert (status, value) == ("ok", i)


def test_small_batches_and_defaults():
  assert env_calls.default_workers() >= 8
  assert env_calls.call_all([], timeout=0.1) == []
  # A batch within the pool runs all at once, as before the pool.
  t0 = time.perf_counter()
  out = env_calls.call_all([_sleeper(0.2, i) for i in range(8)],
                           timeout=1.0)
  assert out == [("ok", i) for i in range(8)]
  assert time.perf_counter() - t0 < 0.6
  with pytest.raises(ValueError, match="workers"):
    env_calls.call_all([lambda: 1], timeout=1.0, workers=-1)


def test_the_rollout_uses_the_limits_pool():
  """`EpisodeLimits.env_workers` sizes the rollout's pool: 6 episodes whose
  step takes 0.3 s, on 2 places with a 0.5 s limit, all go on."""
  limits = episodes_lib.EpisodeLimits(step_timeout=0.5, env_workers=2)
  # pylint: disable-next=protected-access
  book = episodes_lib._Book([None] * 6, limits)
  out = book.call(range(6), lambda row: _sleeper(0.3, row)())
  assert out == [("ok", i) for i in range(6)]
  assert book.live.all() and book.env_seconds > 0.85
