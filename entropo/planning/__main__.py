"""`python -m entropo.planning [--seq_len=N]`: the tables of docs/scaling.md."""

from entropo.planning import report

if __name__ == "__main__":
  report.main()
