"""Error texts of bounded length, whatever the input they describe.

A message that lists what a user sent (keys of a request, names in a file) must not grow with it:
a request with a million unknown keys once produced a 10 MB error reply. These helpers show a few
items, each shortened, and the count.
"""

from __future__ import annotations

from collections.abc import Iterable

ITEMS_SHOWN = 5
ITEM_WIDTH = 40
MESSAGE_LIMIT = 2000


def shorten(text: str, width: int = ITEM_WIDTH) -> str:
    """``text`` cut to ``width`` characters, marked with ``...`` when cut."""
    return text if len(text) <= width else text[: max(width - 3, 1)] + "..."


def preview(items: Iterable, limit: int = ITEMS_SHOWN, width: int = ITEM_WIDTH) -> str:
    """``['a', 'b', ...] (1234 in all)``: the first ``limit`` reprs, each at most ``width``
    characters, and the count when some are left out."""
    items = list(items)
    shown = [shorten(repr(item), width) for item in items[:limit]]
    text = "[" + ", ".join(shown) + (", ...]" if len(items) > limit else "]")
    return text + (f" ({len(items)} in all)" if len(items) > limit else "")


def bounded(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` cut to ``limit`` characters (an error reply's size cap)."""
    return shorten(text, limit)
