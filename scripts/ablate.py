"""Same entry point as ``ldm-inpaint ablate``: ``python scripts/ablate.py --spec ... --out ...``."""

import sys

from ldm_inpaint.ablate import ablate_main

if __name__ == "__main__":
    sys.exit(ablate_main())
