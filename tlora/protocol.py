"""`python -m tlora.protocol MANIFEST`: the paper's evaluation protocol, the command of
`tlora.evaluation.paper_protocol` (see there). `python -m tlora.benchmark` is its old name."""

import sys

from tlora.evaluation.paper_protocol import main

if __name__ == "__main__":
    sys.exit(main())
