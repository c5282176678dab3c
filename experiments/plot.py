"""Overlays the curves of several runs.

    python -m experiments.plot --out=/tmp/entropo/compare \\
        /tmp/entropo/grpo /tmp/entropo/grpo_repo_r

draws `entropy.png`, `reward.png`, `entropy_eval.png` and `pass_at_k.png`
under `--out`, one curve per run and metric, labelled by the workdir's
name; `label=<workdir>` sets a label (`GRPO=/tmp/entropo/grpo`). Each run's
own plots are in `<workdir>/plots`.
"""

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", None, "Directory of the overlay PNGs.")
flags.mark_flag_as_required("out")


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("Give the workdirs of the runs to overlay.")
  from entropo.training import logger  # pylint: disable=g-import-not-at-top
  runs = {}
  for arg in argv[1:]:
    label, sep, workdir = arg.partition("=")
    if not sep:
      label, workdir = arg.rstrip("/").rsplit("/", 1)[-1], arg
    runs[label] = workdir
  try:
    files = logger.plot_runs(runs, _OUT.value)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  print("plots:", ", ".join(str(f) for f in files))


if __name__ == "__main__":
  app.run(main)
