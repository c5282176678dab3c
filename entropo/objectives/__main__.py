"""Prints the table of registered objectives: `python -m entropo.objectives`."""

from entropo.objectives import registry

if __name__ == "__main__":
  registry.load_all()
  print(registry.table())
