"""`python -m tlora.evaluate`: the command of `tlora.evaluation.scoring` (see there)."""

import sys

from tlora.evaluation.scoring import main

if __name__ == "__main__":
    sys.exit(main())
