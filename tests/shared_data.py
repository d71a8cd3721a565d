"""Where the real data sets are: tests read them, the project never does.

`STAGEWISE_SHARED_DATA` if set, else `../shared/data` next to the project (the layout of this
workplace), else `/work/shared/data`; tests that need them skip when none exists.
"""

from __future__ import annotations

import os
from pathlib import Path

_CANDIDATES = [
    os.environ.get("STAGEWISE_SHARED_DATA", ""),
    str(Path(__file__).resolve().parents[2] / "shared" / "data"),
    "/work/shared/data",
]
SHARED_DATA = next((Path(c) for c in _CANDIDATES if c and Path(c).is_dir()), Path(_CANDIDATES[1]))
