"""The report of one output folder: ``write_report(output_dir)`` (page.py) from one pass over
its unit files (scan.py), with plots (plots.py) and pictures reopened from the input (pictures.py)."""

from batch_classify.results.report.page import write_report

__all__ = ["write_report"]
