"""``python -m ano_optimizer.cli``: the ``ano-optimizer`` command."""

import sys

from . import main

sys.exit(main())
