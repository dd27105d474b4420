"""``python -m ldm_inpaint ...``: the ``ldm-inpaint`` command."""

import sys

from ldm_inpaint.cli import main

sys.exit(main())
