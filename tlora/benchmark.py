"""`python -m tlora.benchmark`: the old name of `python -m tlora.protocol` (the paper's evaluation protocol)."""

import sys

from tlora.protocol import main

if __name__ == "__main__":
    sys.exit(main())
