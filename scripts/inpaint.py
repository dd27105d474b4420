"""Same entry point as the ``ldm-inpaint`` console script: ``python scripts/inpaint.py --ckpt ... --image ...``."""

import sys

from ldm_inpaint.cli import main

if __name__ == "__main__":
    sys.exit(main())
