"""`python -m tlora.tiny`: the command of `tlora.families.tiny` (see there)."""

import sys

from tlora.families.tiny import main

if __name__ == "__main__":
    sys.exit(main())
