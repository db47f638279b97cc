"""Participant tests: the project root goes on `sys.path` so `participants` and `market`
import with a plain `pytest`, installed or not."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
