"""``python -m fastres {info,bench,check}`` — see :mod:`fastres.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
