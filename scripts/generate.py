#!/usr/bin/env python
"""Text-to-video with a DiT on a JAX device mesh (see `python scripts/generate.py --help`).

    python scripts/generate.py                                   # tiny random CogVideoX, no download
    python scripts/generate.py --model THUDM/CogVideoX-2b --prompt "..." --mesh cfg=2 --output out.mp4
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xdit_jax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
