"""Process memory sampling from /proc (Linux): anonymous and total resident memory.

Mapped safetensors pages are reclaimable page cache, so *anonymous* memory (RssAnon) is the
figure that says whether a conversion fits in RAM; total RSS is reported beside it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path


def read_status(pid: int | str = "self") -> dict[str, int]:
    """RssAnon, RssFile, VmRSS, VmHWM of a process in bytes (empty off Linux)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in {"RssAnon", "RssFile", "VmRSS", "VmHWM"}:
            out[key] = int(rest.split()[0]) * 1024
    return out


class PeakSampler:
    """Samples a process's memory in a background thread; keeps the peaks.

    >>> with PeakSampler() as s:
    ...     work()
    >>> s.peak_anon, s.peak_rss
    """

    def __init__(self, pid: int | str = "self", interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.baseline_anon = 0
        self.baseline_rss = 0
        self.peak_anon = 0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> bool:
        st = read_status(self.pid)
        if not st:
            return False
        self.peak_anon = max(self.peak_anon, st.get("RssAnon", 0))
        self.peak_rss = max(self.peak_rss, st.get("VmRSS", 0))
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sample():
                return
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        st = read_status(self.pid)
        self.baseline_anon = st.get("RssAnon", 0)
        self.baseline_rss = st.get("VmRSS", 0)
        self.peak_anon, self.peak_rss = self.baseline_anon, self.baseline_rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    @property
    def anon_above_baseline(self) -> int:
        return max(0, self.peak_anon - self.baseline_anon)


def limit_heap_retention(threshold: int = 1 << 20) -> bool:
    """Make glibc return big freed blocks to the OS at once (Linux/glibc only).

    glibc raises its mmap threshold dynamically (up to 32 MB) after big blocks are freed,
    after which tensor-sized blocks come from the heap and stay in RSS once freed. Streaming
    conversion allocates and frees one tensor-sized block after another, so that retention
    would show as a growing "leak". Fixing the threshold (which disables the adjustment)
    keeps anonymous memory at the working set. Returns False where mallopt is unavailable.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, threshold) == 1
        libc.mallopt(m_trim_threshold, threshold)
        return ok
    except (OSError, AttributeError):
        return False
