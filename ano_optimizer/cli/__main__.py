"""``python -m ano_optimizer.cli``: the ``ano-optimizer`` command."""

import sys

from . import main

if __name__ == "__main__":  # not when a tool imports every module (documentation builders)
    sys.exit(main())
