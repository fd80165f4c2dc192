# ruff: noqa: I001 - _signals is imported before torch on purpose
"""`python -m longctx ...` (what torchrun runs: `torchrun ... -m longctx train CONFIG`).

`record` writes a failing rank's traceback to torch elastic's error file, so torchrun's summary shows the
exception and where it happened, not just an exit code."""

import sys

from . import _signals  # noqa: F401 - first, before torch: notes this rank's parent (torchrun's agent) at once
from torch.distributed.elastic.multiprocessing.errors import record

from .cli import main

sys.exit(record(main)())
