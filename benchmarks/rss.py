"""Process memory for the benchmarks: resident set size now and at its peak (Linux ``/proc``).

``torch`` allocates outside Python's allocator, so ``tracemalloc`` misses it; the kernel's
``VmRSS`` / ``VmHWM`` see everything. :func:`reset_peak` (``/proc/self/clear_refs``) lets one
process measure the peak of one phase: reset after building the model, run the phase, read the
peak.

Example:
    >>> rss_mib() > 0 and peak_rss_mib() >= rss_mib() - 1
    True
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["rss_mib", "peak_rss_mib", "reset_peak"]

_STATUS = Path("/proc/self/status")


def _status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{key} not in {_STATUS}; these benchmarks measure memory on Linux only.")
    return int(match.group(1))


def rss_mib() -> float:
    """Resident set size of this process now, in MiB."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """Peak resident set size since the process started or the last :func:`reset_peak`, in MiB."""
    return _status_kib("VmHWM") / 1024


def reset_peak() -> None:
    """Reset the peak to the current resident set size (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")
