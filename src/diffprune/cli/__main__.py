"""`python -m diffprune.cli ...` (also `accelerate launch -m diffprune.cli ...`)."""

import sys

from . import main

sys.exit(main())
