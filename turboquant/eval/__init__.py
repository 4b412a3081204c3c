"""Long-context evaluation: needle grid and RULER-style tasks, LongBench-E, official metrics.

* :mod:`turboquant.eval.needle`    needle-in-a-haystack generator (``Case``, ``needle_grid``)
* :mod:`turboquant.eval.ruler`     task registry: ``niah_single``, ``niah_multikey``,
                                   ``niah_multivalue``, ``vt`` (``get_task``)
* :mod:`turboquant.eval.longbench` LongBench-E jsonl loader, prompts, head+tail truncation
* :mod:`turboquant.eval.metrics`   LongBench metrics by name (``get_metric``, ``score_example``)
* :mod:`turboquant.eval.runner`    one prompt under several cache settings (shared prefill, real
                                   ``generate``), grid runs and accuracies
* :mod:`turboquant.eval.plots`     needle heatmap for the C09 report
"""

from turboquant.eval.metrics import available_metrics, get_metric, register_metric, score_example
from turboquant.eval.needle import Case, make_needle_case, needle_grid, score_all
from turboquant.eval.ruler import available_tasks, get_task, register_task

__all__ = [
    # needle / RULER
    "Case",
    "available_metrics",
    "available_tasks",
    # metrics
    "get_metric",
    "get_task",
    "make_needle_case",
    "needle_grid",
    "register_metric",
    "register_task",
    "score_all",
    "score_example",
]
