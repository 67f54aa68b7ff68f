"""The messages a bot answered lately, so that an edit of one never draws a second answer.

A message is claimed when its handler takes it on, before anything awaits (so its edit,
handled meanwhile, finds it claimed), and released if it is not answered after all (the
rate limits or the access policy refused it): a flood of refused messages is not kept. What
is kept is bounded twice: by age (an edit older than that is not answered anyway) and by
count, so no flood can grow it without end.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable

__all__ = ["AnsweredMessages"]


class AnsweredMessages:
    """Message keys answered (or being answered) within ``keep_s``, at most ``max_count`` of them."""

    def __init__(self, keep_s: float, max_count: int) -> None:
        self.keep_s = keep_s
        self.max_count = max_count
        self._when: OrderedDict[Hashable, float] = OrderedDict()  # key → when claimed, oldest first

    def __len__(self) -> int:
        return len(self._when)

    def claim(self, keys: Iterable[Hashable]) -> bool:
        """Whether none of these messages was claimed before; from now on all of them are."""
        keys = list(keys)
        if any(key in self._when for key in keys):
            return False
        now = time.monotonic()
        while self._when and next(iter(self._when.values())) < now - self.keep_s:
            self._when.popitem(last=False)
        self._when.update(dict.fromkeys(keys, now))
        while len(self._when) > self.max_count:
            self._when.popitem(last=False)
        return True

    def release(self, keys: Iterable[Hashable]) -> None:
        """Forget these messages: they were not answered after all."""
        for key in keys:
            self._when.pop(key, None)
