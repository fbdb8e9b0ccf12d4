"""Results of runs: the metrics and summary files, the index of past runs, and reports."""

from hetfl.results.index import (
    INDEX_NAME,
    format_accuracy,
    format_duration,
    format_mb,
    index_path,
    list_runs,
    record_run,
    runs_table,
)
from hetfl.results.metrics import (
    CONFIG_NAME,
    METRICS_NAME,
    SUMMARY_NAME,
    MetricsLog,
    find_runs,
    read_metrics,
    read_summary,
    write_summary,
)
from hetfl.results.report import ReportOptions, moving_average, render_report

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "METRICS_NAME",
    "SUMMARY_NAME",
    "MetricsLog",
    "find_runs",
    "format_accuracy",
    "format_duration",
    "format_mb",
    "index_path",
    "list_runs",
    "read_metrics",
    "read_summary",
    "record_run",
    "ReportOptions",
    "moving_average",
    "render_report",
    "runs_table",
    "write_summary",
]
