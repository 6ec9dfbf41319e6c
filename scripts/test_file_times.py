"""Per-file test times from a pytest ``--durations=0`` report, for tests/file_times.json (the order in which
tests/conftest.py hands the files to the xdist workers: longest first, so that no long file starts last).

    python -m pytest -q -n 3 --dist loadfile --durations=0 > report.txt
    python scripts/test_file_times.py report.txt > tests/file_times.json

(Only the order matters: times measured on a loaded machine serve. Session 21's file: a 3-worker fresh-clone run of
the default suite with the four new families and the image-to-image / inpainting pipelines (17:32 pytest wall, 33:30
user CPU); a file not listed counts as the median.)
"""

import json
import re
import sys
from collections import defaultdict


def file_times(lines) -> dict[str, float]:
    """{test file: seconds of its setup, calls and teardowns}, from the ``--durations`` lines
    ("12.34s call     tests/test_x.py::test_y[...]")."""
    times = defaultdict(float)
    for line in lines:
        m = re.match(r"\s*([0-9.]+)s\s+(?:setup|call|teardown)\s+(\S+?\.py)::", line)
        if m:
            times[m.group(2)] += float(m.group(1))
    return {k: round(v, 1) for k, v in sorted(times.items(), key=lambda kv: -kv[1])}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(json.dumps(file_times(f), indent=1))
