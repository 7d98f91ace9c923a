"""`python -m poolwise` is the `poolwise` command."""

import sys

from .cli import main

sys.exit(main())
