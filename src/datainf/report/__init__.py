"""The reports: self-contained HTML pages (pictures embedded as PNG) of the jobs and the
studies, from the Jinja2 templates in ``templates/``."""

from .figures import detection_plot, figure_png, image_uri, png_base64
from .pages import (
    NONE_LISTED,
    _none_note,  # noqa: F401 (tests check the empty-list note)
    class_breakdown,
    explain_generation_page,
    explain_image_page,
    render,
    shown,
    stage_line,
    study_page,
    write_report,
)

__all__ = ["NONE_LISTED", "class_breakdown", "detection_plot", "explain_generation_page",
           "explain_image_page", "figure_png", "image_uri", "png_base64", "render", "shown",
           "stage_line", "study_page", "write_report"]
