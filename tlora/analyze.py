"""`python -m tlora.analyze`: the command of `tlora.evaluation.analysis` (see there)."""

import sys

from tlora.evaluation.analysis import main

if __name__ == "__main__":
    sys.exit(main())
