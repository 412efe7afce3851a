"""torchrun driver for tests/test_distributed.py: several 2-process training runs in one launch, so the test pays
the process start-up (torch, pandas, opacus imports) once. Each run is a ``synthehr_core.model.torchrun`` command
line; rank 0 prints one JSON line per run."""
from __future__ import annotations

import json
import sys

from synthehr_core.model import distributed, torchrun


def main() -> None:
    runs = json.loads(sys.argv[1])  # list of argument lists for synthehr_core.model.torchrun.main
    distributed.setup()
    try:
        for argv in runs:
            torchrun.main(argv)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
