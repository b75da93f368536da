"""Chunked residual gathering (first version: routing through dar_route, the summary by a plain sum)."""
from __future__ import annotations

from .op import dar_route


def dar_gather(sources, addends, q, gain, eps: float = 1e-6):
    """(h, c): c = sum(addends) (None without addends), h = dar_route([*sources, c], q, gain, eps)."""
    if not addends:
        return dar_route(sources, q, gain, eps), None
    c = addends[0]
    for a in addends[1:]:
        c = c + a
    return dar_route([*sources, c], q, gain, eps), c
