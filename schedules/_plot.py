"""A PNG of a schedule over time, with its update points marked (matplotlib, lazily)."""

from __future__ import annotations

from pathlib import Path

from ._checks import check_int
from ._core import Schedule, update_points

__all__ = ["plot_schedule"]


def plot_schedule(
    schedule: Schedule, until: int, path: str | Path, *, title: str | None = None
) -> Path:
    """Write a PNG of ``schedule(t)`` for ``0 <= t <= until`` with update points marked.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
    Returns the path written.

    >>> import tempfile, pathlib
    >>> from prunekit.schedules import Polynomial, plot_schedule
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "poly.png"
    >>> plot_schedule(Polynomial(0.0, 0.9, begin=0, end=100, frequency=10), 120, out).exists()
    True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    until = check_int("until", until)
    times = list(range(until + 1))
    updates = update_points(schedule, until)
    figure = Figure(figsize=(6, 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(times, [schedule(t) for t in times], drawstyle="steps-post", label="sparsity")
    axes.plot(updates, [schedule(t) for t in updates], "o", markersize=4, label="update")
    axes.set(xlabel="t", ylabel="target sparsity", ylim=(0, 1), xlim=(0, max(until, 1)))
    axes.set_title(title if title is not None else repr(schedule), fontsize=8, wrap=True)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path
