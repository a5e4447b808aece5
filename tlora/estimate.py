"""`python -m tlora.estimate`: the command of `tlora.train.estimate` (see there)."""

import sys

from tlora.train.estimate import main

if __name__ == "__main__":
    sys.exit(main())
