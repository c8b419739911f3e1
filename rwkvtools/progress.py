"""One progress bar for every long job: tqdm on stderr (never stdout, which carries --json
reports), or None when disabled, so callers write ``if bar is not None: bar.update(n)``."""
from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, enabled: bool | None = None, unit: str = "it", **kw):
    """A bar for ``total`` units, or None. ``enabled`` None: only when stderr is a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, **kw)
