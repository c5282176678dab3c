"""Prints the table of registered controllers (`python -m
entropo.controllers`)."""

from entropo.controllers import registry

if __name__ == "__main__":
  registry.load_all()
  print(registry.table())
