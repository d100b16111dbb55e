"""Temporary re-export of `ldtok.evaluation.report` for importers outside the evaluation refactor (remove after the
merge, once they import `ldtok.evaluation.report`)."""

from .evaluation.report import (  # noqa: F401
    CSV_NAME,
    HTML_NAME,
    JSON_NAME,
    environment,
    render_html,
    report_dict,
    write_per_image_csv,
    write_report,
)
