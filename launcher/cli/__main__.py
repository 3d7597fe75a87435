"""``python -m aitrain.launcher.cli``: the ``aitrain`` command."""

import sys

from aitrain.launcher.cli import main

sys.exit(main())
