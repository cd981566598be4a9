"""``python -m cream_wsol``: the ``cream-wsol`` command line (see :mod:`cream_wsol.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
