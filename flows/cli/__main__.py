"""``python -m flows.cli``: the ``forgetless`` command."""

import sys

from flows.cli.main import main

sys.exit(main())
