"""The word-level rewrite one positive example makes to a model's output, and applying it to other outputs
(the deletion editor's self-generated variants: their positives are their own outputs rewritten)."""
from __future__ import annotations

import difflib


def rewrite_of(greedy: str, positive: str, unwanted: str) -> tuple[list[str], list[str]] | None:
    """The word-level edit the positive example makes to the greedy output around the unwanted span:
    ``(old words, new words)`` from :mod:`difflib` opcodes touching the span (``(["zise"], [])`` for a
    deleted hallucination, ``(["rizor"], ["kabu"])`` for a mistranslation); None if the span is absent."""
    g, p, u = greedy.split(), positive.split(), unwanted.split()
    at = next((i for i in range(len(g) - len(u) + 1) if g[i:i + len(u)] == u), None)
    if at is None or not u:
        return None
    lo, hi = at, at + len(u)
    # replaced/deleted words that overlap the span, and insertions strictly inside it
    ops = [op for op in difflib.SequenceMatcher(None, g, p, autojunk=False).get_opcodes()
           if op[0] != "equal" and ((op[1] < hi and op[2] > lo) or (op[1] == op[2] and lo < op[1] < hi))]
    if not ops:
        return u, []
    i1, i2 = min(op[1] for op in ops), max(op[2] for op in ops)
    j1, j2 = min(op[3] for op in ops), max(op[4] for op in ops)
    return g[i1:i2], p[j1:j2]


def apply_rewrite(output: str, rewrite: tuple[list[str], list[str]], unwanted: str) -> str | None:
    """``output`` with the rewrite applied at the one occurrence of the unwanted span; None if the span
    does not occur exactly once or the rewrite's old words do not cover it there."""
    words, u = output.split(), unwanted.split()
    hits = [i for i in range(len(words) - len(u) + 1) if words[i:i + len(u)] == u]
    old, new = rewrite
    if len(hits) != 1 or not old:
        return None
    # align the old words so that they cover the unwanted span at hits[0]
    k = next((j for j in range(len(old) - len(u) + 1) if old[j:j + len(u)] == u), None)
    if k is None:
        return None
    start = hits[0] - k
    if start < 0 or words[start:start + len(old)] != old:
        return None
    out = words[:start] + new + words[start + len(old):]
    return " ".join(out) if out else None
