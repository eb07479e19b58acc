"""Tables and figures."""

from kdq.report.plots import plot_confusion, plot_history
from kdq.report.sweep import plot_sweep, size_table, summarize_sweep, sweep_table, weight_bits
from kdq.report.table import human_bytes, markdown_table

__all__ = [
    "plot_confusion", "plot_history", "markdown_table", "human_bytes",
    "plot_sweep", "size_table", "summarize_sweep", "sweep_table", "weight_bits",
]
