"""``python -m gradkit``: the ``gradkit`` command line (see :mod:`gradkit.cli`)."""

import sys

from gradkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
