"""`bigmodel report`: one self-contained, offline HTML page per run or per comparison of runs."""

from bigmodel.report.build import Report, ReportContext, build_report, write_report

__all__ = ["Report", "ReportContext", "build_report", "write_report"]
