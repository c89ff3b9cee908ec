"""A one-line progress report on stderr: redrawn on a terminal, every 10% in logs (CI, pipes)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    def __init__(self, total: int, label: str, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total, self.label, self.done = max(total, 1), label, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self._last_decile = -1

    def __call__(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        line = f"{self.label}: {self.done}/{self.total} images ({100 * frac:3.0f}%, {rate:.0f} img/s)"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if self.done >= self.total else ""))
            self.stream.flush()
        elif int(frac * 10) > self._last_decile:
            self._last_decile = int(frac * 10)
            self.stream.write(line + "\n")
