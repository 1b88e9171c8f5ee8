"""Progress bars: tqdm when it is installed, else a simple line printer; silent when the
output is not a terminal (``--progress auto``) or when told so (``--progress off``)."""
from __future__ import annotations

import sys
import time

PROGRESS_MODES = ("auto", "on", "off")


def progress_enabled(mode: str = "auto", stream=None) -> bool:
    stream = stream or sys.stderr
    if mode == "on":
        return True
    if mode == "off":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """``with Progress(total, desc, enabled) as p: ... p.update(loss=0.3)``."""

    def __init__(self, total: int, desc: str, enabled: bool, stream=None):
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.n = 0
        self._bar = None
        self._last = 0.0
        if enabled:
            try:
                from tqdm.auto import tqdm
                self._bar = tqdm(total=total, desc=desc, leave=False, file=self.stream, dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()},
                                      refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= 1.0 or self.n >= self.total:
            self._last = now
            extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
            end = "\n" if self.n >= self.total else ""
            self.stream.write(f"\r{self.desc}: {self.n}/{self.total} {extra}{end}")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.n < self.total:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
