"""Market core tests: plain data in, plain data out (no server, no clock, no database).

The project root goes on `sys.path` so that `market` and `tests.market.builders` import
with a plain `pytest` from the repository root, installed or not.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
