"""The generated bad-input tests (tests/test_fuzz*.py) at a larger count than CI runs.

    python benchmarks/fuzz.py [--scale 20]

CI runs each property with its bounded count (about 2,200 cases in all); this multiplies
every count by ``--scale`` (20: about 44,000 cases) and prints pytest's summary. The cases
are derandomised: a given scale always runs the same inputs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=20.0,
                        help="multiply every property's example count (default 20)")
    args = parser.parse_args()
    env = os.environ | {"SAMKIT_FUZZ_SCALE": str(args.scale), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
               "--hypothesis-show-statistics", str(REPO / "tests" / "test_fuzz.py"),
               str(REPO / "tests" / "test_fuzz_api.py"), str(REPO / "tests" / "test_fuzz_readers.py")]
    return subprocess.run(command, cwd=REPO, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
