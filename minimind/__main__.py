"""`python -m minimind <verb>` (also what `torchrun -m minimind <verb>` runs)."""

import sys

from minimind.cli import main

sys.exit(main())
