"""How much memory this machine can give a run."""

from __future__ import annotations

import os


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gigabytes(n: float) -> str:
    return f"{n / 2**30:,.1f} GB"
