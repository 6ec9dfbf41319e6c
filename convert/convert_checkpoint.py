#!/usr/bin/env python
"""Convert a diffusers pipeline folder (or hub id) into an xdit_jax folder (orbax params + configs).

    python convert/convert_checkpoint.py /path/to/CogVideoX-2b /path/to/CogVideoX-2b-jax [--dtype bfloat16]

No torch is needed. Refuses missing/unexpected/misshaped tensors with a clear message and leaves
nothing behind; never overwrites an existing output without --overwrite.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xdit_jax.conversion import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
