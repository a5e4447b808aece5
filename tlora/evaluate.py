"""`python -m tlora.evaluate`: the command of `tlora.evaluation.evaluate` (see there)."""

import sys

from tlora.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
