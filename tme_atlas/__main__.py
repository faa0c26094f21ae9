"""``python -m tme_atlas``: the ``tme-atlas`` command."""

import sys

from tme_atlas.cli import main

sys.exit(main())
