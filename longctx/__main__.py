"""`python -m longctx ...` (what torchrun runs: `torchrun ... -m longctx train CONFIG`)."""

import sys

from .cli import main

sys.exit(main())
