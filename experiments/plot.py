"""Overlays the curves of several runs.

    python -m experiments.plot --out=/tmp/entropo/compare \\
        /tmp/entropo/grpo /tmp/entropo/grpo_repo_r

draws `entropy.png`, `reward.png`, `entropy_eval.png` and `pass_at_k.png`
under `--out`, one curve per run and metric, labelled by the workdir's
name (or its last path parts where names repeat: `seed0/grpo`,
`seed1/grpo`); `label=<workdir>` sets a label (`GRPO=/tmp/entropo/grpo`).
Each run's own plots are in `<workdir>/plots`.
"""

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", None, "Directory of the overlay PNGs.")
flags.mark_flag_as_required("out")


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("Give the workdirs of the runs to overlay.")
  from entropo.training import logger  # pylint: disable=g-import-not-at-top
  named = [arg.partition("=") for arg in argv[1:]]
  unnamed = [arg for arg in argv[1:] if "=" not in arg]
  # Runs without a label= are labelled by their names, or by as many of
  # their last path parts as tell them apart (seed0/grpo, seed1/grpo).
  default = dict(zip(unnamed, logger.run_labels(unnamed)))
  runs = {}
  for arg, (label, sep, workdir) in zip(argv[1:], named):
    label, workdir = (label, workdir) if sep else (default[arg], arg)
    if label in runs:
      raise app.UsageError(f"two runs are labelled {label!r}; name them with "
                           f"label=<workdir>")
    runs[label] = workdir
  try:
    files = logger.plot_runs(runs, _OUT.value)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  print("plots:", ", ".join(str(f) for f in files))


if __name__ == "__main__":
  app.run(main)
