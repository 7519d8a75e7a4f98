"""``python -m mq9`` is the ``mq9`` command."""

import sys

from mq9.cli import main

# Guarded: spawned children import this module's parent package, never run it.
if __name__ == "__main__":
    sys.exit(main())
