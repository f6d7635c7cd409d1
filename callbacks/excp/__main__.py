"""Entry point: ``python -m callbacks.excp compress|decompress|inspect``."""

import sys

from callbacks.excp.cli import main

sys.exit(main())
