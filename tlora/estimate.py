"""`python -m tlora.estimate`: the command of `tlora.train.estimator` (see there)."""

import sys

from tlora.train.estimator import main

if __name__ == "__main__":
    sys.exit(main())
