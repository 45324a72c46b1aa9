"""``python -m seqpar``: the ``seqpar`` command (prepare, generate, eval, export)."""
import sys

from seqpar.cli import main

sys.exit(main())
