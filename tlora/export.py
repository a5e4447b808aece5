"""`python -m tlora.export`: the command of `tlora.interop.exporting` (see there)."""

import sys

from tlora.interop.exporting import main

if __name__ == "__main__":
    sys.exit(main())
