"""A stand-in for tqdm that records what a loop tells its bar (total, initial, updates, disabled)."""

from __future__ import annotations

from typing import Any


def recording_bar(bars: list[Any]) -> type:
    """A tqdm replacement class; each bar it makes is appended to ``bars``."""

    class Bar:
        def __init__(self, total: int | None = None, initial: int = 0, disable: bool = False, **_: Any) -> None:
            self.total, self.n, self.initial, self.disable = total, initial, initial, disable
            bars.append(self)

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *_: Any) -> bool:
            return False

        def update(self, n: int) -> None:
            self.n += n

    return Bar
