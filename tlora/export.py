"""`python -m tlora.export`: the command of `tlora.interop.export` (see there)."""

import sys

from tlora.interop.export import main

if __name__ == "__main__":
    sys.exit(main())
