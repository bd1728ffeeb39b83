"""Progress bars on stderr (tqdm), only when stderr is a terminal."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TYPE_CHECKING, Never

if TYPE_CHECKING:
    from tqdm import tqdm


class Progress:
    """A byte-counting bar per image; silent when disabled."""

    def __init__(self, label: str, total: int, *, enabled: bool) -> None:
        self._bar: tqdm[Never] | None = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm  # imported only for a terminal: it costs start-up time

            self._bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, leave=False)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def skip(self, n: int) -> None:
        """Count bytes that need no transfer (unchanged regions)."""
        self.update(n)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.close()
