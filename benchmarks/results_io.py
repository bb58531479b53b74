"""Writing a results JSON that a benchmark rewrites as it goes (after every point or phase): through a
temporary file and a rename, so a run killed mid-write (at the device's time limit) leaves the last
complete version, never a truncated file."""

from __future__ import annotations

import json
import os


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)
