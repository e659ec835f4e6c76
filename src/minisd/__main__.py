"""`python -m minisd ...` is the `minisd` command (and `torchrun -m minisd generate ...` runs it per process)."""

import sys

from .cli import main

sys.exit(main())
