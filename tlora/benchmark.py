"""`python -m tlora.benchmark`: the command of `tlora.evaluation.protocol` (see there)."""

import sys

from tlora.evaluation.protocol import main

if __name__ == "__main__":
    sys.exit(main())
