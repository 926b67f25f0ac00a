"""Where the explorer's pages and scripts come from: its own templates and static files, and
plotly.js from the installed plotly package (no CDN)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"


def plotly_js() -> Path:
    return Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))
