"""Looking at results: overlay panels (`overlays`), inline SVG charts (`plots`) and the
self-contained HTML report of one or more run folders (`html.write_report`,
`weakseg report`; docs/report.md)."""

from weakseg.report.html import write_report

__all__ = ["write_report"]
