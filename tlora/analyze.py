"""`python -m tlora.analyze`: the command of `tlora.evaluation.analyze` (see there)."""

import sys

from tlora.evaluation.analyze import main

if __name__ == "__main__":
    sys.exit(main())
