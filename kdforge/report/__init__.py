"""Tables and plots from run results: ``kdforge report`` (table.py), PNG plots (plots.py), pictures of
segmentation masks (masks.py) and the published numbers kdforge compares against (published.py)."""

from kdforge.report.masks import MaskGrid, write_mask_grid
from kdforge.report.published import PUBLISHED, Published, lookup
from kdforge.report.table import Group, Report, Row, build_groups, replace_section, scan_runs, write_report

__all__ = [
    "PUBLISHED",
    "Group",
    "MaskGrid",
    "Published",
    "Report",
    "Row",
    "build_groups",
    "lookup",
    "replace_section",
    "scan_runs",
    "write_mask_grid",
    "write_report",
]
