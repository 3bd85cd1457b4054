"""``python -m fxsd``: the ``fxsd`` command line (:mod:`fxsd.tools.cli`), for environments whose
scripts folder is not on ``PATH``."""

from __future__ import annotations

import sys

from fxsd.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
