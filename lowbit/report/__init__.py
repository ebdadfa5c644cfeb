"""Side-by-side recipe studies (`lowbit compare`): train, compare to a baseline, write a report."""

from lowbit.report.compare import (
    PARITY_TARGETS,
    CompareResult,
    Study,
    Target,
    compare,
    make_study,
    parse_recipes,
    summarize,
)

__all__ = [
    "PARITY_TARGETS",
    "CompareResult",
    "Study",
    "Target",
    "compare",
    "make_study",
    "parse_recipes",
    "summarize",
]
