"""Same entry point as ``ldm-inpaint ablate``: ``python scripts/ablate.py --spec ... --out ...``."""

import sys

from ldm_inpaint.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
