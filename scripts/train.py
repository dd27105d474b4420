"""``ldm-inpaint train`` as a script: ``python scripts/train.py --ckpt INIT --data DIR --out RUN --steps N ...``."""

import sys

from ldm_inpaint.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
