"""Progress on stderr while long work runs, for the command line's long commands.

:class:`Progress` shows a tqdm bar when tqdm is installed (the ``progress`` extra) and plain
lines otherwise, and keeps quiet when stderr is not a terminal. ``fxsd bench`` reports its steps
with :meth:`Progress.steps`, ``fxsd inspect`` the modules it traces one by one with
:meth:`Progress.counter`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Progress"]



class Progress:
    """Progress on stderr while long work runs: a tqdm bar when tqdm is installed (the
    ``progress`` extra), plain lines otherwise, nothing when ``enabled`` is false (``None``:
    when stderr is a terminal). ``fxsd bench`` reports its steps with it, ``fxsd inspect`` the
    modules it traces one by one."""

    def __init__(self, enabled: bool | None, prefix: str = "[fxsd bench]") -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.prefix = prefix
        self.bars: list[Any] = []  # open tqdm bars, closed by close() when work stops early
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.tqdm = tqdm

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"{self.prefix} {message}", file=sys.stderr, flush=True)

    def steps(self, label: str, total: int) -> Iterator[int]:
        """``range(total)``, reported as it goes."""
        if not self.enabled:
            yield from range(total)
            return
        if self.tqdm is not None:
            bar = self.tqdm(total=total, desc=f"{self.prefix} {label}", file=sys.stderr,
                            leave=False)
            self.bars.append(bar)
            for i in range(total):
                yield i
                bar.update(1)
            self._close(bar)
            return
        self.say(f"{label}: 0/{total}")
        every = max(1, total // 10)
        for i in range(total):
            yield i
            if (i + 1) % every == 0 or i + 1 == total:
                self.say(f"{label}: {i + 1}/{total}")

    @contextmanager
    def counter(self, label: str, unit: str) -> Iterator[Callable[[str], None]]:
        """A function to call as each of an unknown number of items starts (its name shown):
        a bar of the count so far, or a line every 10 items."""
        count = 0
        bar = None
        if self.enabled and self.tqdm is not None:
            bar = self.tqdm(desc=f"{self.prefix} {label}", unit=f" {unit}", file=sys.stderr,
                            leave=False)
            self.bars.append(bar)

        def tick(name: str) -> None:
            nonlocal count
            count += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(name or "<root>", refresh=False)
            elif count % 10 == 1:
                self.say(f"{label}: {unit} {count} ({name or '<root>'})")

        try:
            yield tick
        finally:
            if bar is not None:
                self._close(bar)

    def _close(self, bar: Any) -> None:
        bar.close()
        if bar in self.bars:
            self.bars.remove(bar)

    def close(self) -> None:
        """Close the bars still open (work stopped early): the table prints below them."""
        for bar in list(self.bars):
            self._close(bar)
