"""`python -m tlora.tiny`: the command of `tlora.families.tiny_models` (see there)."""

import sys

from tlora.families.tiny_models import main

if __name__ == "__main__":
    sys.exit(main())
