"""`python -m synthehr_build` is `python -m synthehr_build.images`."""
import sys

from synthehr_build.images import main

sys.exit(main())
