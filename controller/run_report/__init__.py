"""`microte report`: a run's figures and one self-contained HTML page, from its ledger alone.

queries.py aggregates the ledger in SQL (per slot, participant, request, LEM, KPI) into
numpy arrays and small structs; figures.py draws them (matplotlib, Agg) as PNG bytes;
page.py writes the HTML; command.py is the command: URL, output directory, errors.
docs/report.md describes each figure and the tables and columns it comes from.
"""

from controller.run_report.command import ReportError, add_arguments, main, report

__all__ = ["ReportError", "add_arguments", "main", "report"]
