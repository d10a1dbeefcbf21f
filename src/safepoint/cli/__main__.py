"""``python -m safepoint.cli``: the same as the ``safepoint`` command."""

import sys

from safepoint.cli.commands import main

sys.exit(main())
