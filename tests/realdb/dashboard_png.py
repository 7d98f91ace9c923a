"""Draw a service dashboard's panels from Prometheus answers, as a PNG (matplotlib, offline).

Grafana is not needed: each panel of the rendered dashboard JSON becomes one plot of the
series its queries returned over the run, with the panel's title and unit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only

import matplotlib.pyplot as plt

UNITS = {"s": "seconds", "reqps": "per second", "short": ""}


def draw(title: str, panels: list[dict[str, Any]], path: Path, start: float, end: float) -> None:
    """panels: [{title, unit, series: [{label, values: [(unix time, value)]}]}], drawn from
    `start` to `end` (unix times)."""
    columns = 2
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(14, 3.2 * rows), squeeze=False)
    for axis, panel in zip(axes.flat, panels, strict=False):
        for series in panel["series"]:
            times = [t - start for t, _ in series["values"]]
            values = [v for _, v in series["values"]]
            constant = series["label"].startswith(("declared", "pool_timeout"))
            axis.plot(times, values, label=series["label"], linestyle="--" if constant else "-")
        axis.set_title(panel["title"], fontsize=10)
        axis.set_ylabel(UNITS.get(panel["unit"], panel["unit"]), fontsize=8)
        axis.set_xlabel("seconds into the run", fontsize=8)
        axis.set_xlim(0, end - start)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        if panel["series"]:
            axis.legend(fontsize=7, loc="upper left")
        else:
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
