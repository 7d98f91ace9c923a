"""poolwise: connection budgets for every service on a PostgreSQL cluster (`poolwise --help`)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("poolwise")
except PackageNotFoundError:  # run from a checkout without installing
    __version__ = "0+unknown"
