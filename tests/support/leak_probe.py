"""Run by tests/test_isolation.py in an inner pytest session: writes where KURA_LEAK_TARGET says,
which the session's guard must catch (and nothing when it is unset)."""

import os
from pathlib import Path


def test_write_where_told():
    target = os.environ.get("KURA_LEAK_TARGET")
    if target:
        (Path(target) / "leaked.json").write_text("{}")
