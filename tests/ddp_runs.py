"""torchrun driver for tests/test_distributed.py: several 2-process training runs in one launch, so the test pays
the process start-up (torch, pandas, opacus imports) once. Each run is a ``synthehr_core.distributed`` command
line; rank 0 prints one JSON line per run."""
from __future__ import annotations

import json
import sys

from synthehr_core import distributed


def main() -> None:
    runs = json.loads(sys.argv[1])  # list of argument lists for synthehr_core.distributed.main
    distributed.setup()
    try:
        for argv in runs:
            distributed.main(argv)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
