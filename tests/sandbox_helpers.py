"""What the sandbox tests share: the test limits and an episode that
checks what it leaves behind (tests/test_sandbox.py,
tests/test_sandbox_hostile.py)."""

import os
import time

from entropo.tasks import code_env
from entropo.tasks import local_sandbox
from entropo.tasks import sandbox as sandbox_lib

WALL = 1.0
SLACK = 3.0  # starting and killing a worker on a busy 2-core machine
LIMITS = sandbox_lib.Limits(wall_seconds=WALL, cpu_seconds=3,
                            memory_bytes=256 * 2**20, processes=12,
                            file_bytes=2**20, output_chars=500,
                            tmp_bytes=8 * 2**20)


class Episode:
  """A CodeEnvironment with the test limits, and what it left behind."""

  def __init__(self, limits: sandbox_lib.Limits = LIMITS):
    self.wall = limits.wall_seconds
    self.env = code_env.CodeEnvironment(code_env.local_sandbox(limits))
    self.env.start()

  def step(self, action: str):
    start = time.monotonic()
    turn = self.env.step(action)
    elapsed = time.monotonic() - start
    assert elapsed < self.wall + SLACK, (action, elapsed)
    return turn

  def close_and_check(self):
    box = self.env.sandbox
    if box is None:
      return
    workdir, info = box._workdir, box.info  # pylint: disable=protected-access
    proc = box._proc  # pylint: disable=protected-access
    self.env.close()
    assert workdir is None or not os.path.exists(workdir)
    if proc is not None:
      assert proc.poll() is not None
    if info.get("uid") not in (None, os.getuid()):
      assert local_sandbox.uid_processes(info["uid"]) == []
