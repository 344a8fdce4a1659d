"""Evaluation of edits: fact metrics (CounterFact conventions), general-text metrics, deletions.

- :mod:`editing.metrics.facts`: efficacy / paraphrase / neighbourhood (+ top-1 variants),
  locality against cached :class:`~editing.metrics.facts.BaseOutputs`, retention.
- :mod:`editing.metrics.text`: held-out perplexity, generation fluency (n-gram entropy).
- :mod:`editing.metrics.deletion`: behaviour-deletion metrics and chrF.

Submodules are imported on use so ``import editing.metrics`` stays light.
"""
from __future__ import annotations

__all__ = ["facts", "text"]
