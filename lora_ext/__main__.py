"""Entry point: `python -m lora_ext ...` (see lora_ext.app.cli)."""

import sys

from lora_ext.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
