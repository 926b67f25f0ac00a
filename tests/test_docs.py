"""The docs site builds with --strict (a broken link, a missing page or a bad docstring
fails), and its generated references hold every command and every query template."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys

import click
import pytest

from flowdb.cli import cli
from flowdb.store.templates import templates
from helpers import ROOT


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's notice about MkDocs 2.0, not a warning
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    assert "WARNING" not in done.stderr, done.stderr
    return out


def text_of(page) -> str:
    """A built page's visible text, tags dropped and entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8")))


def command_names(group: click.Group, prefix: str = "flowdb") -> list[str]:
    names = []
    for name, command in group.commands.items():
        names.append(f"{prefix} {name}")
        if isinstance(command, click.Group):
            names += command_names(command, f"{prefix} {name}")
    return names


def test_the_site_has_its_pages(site):
    pages = sorted(site.rglob("index.html"))
    assert len(pages) >= 8, [str(p.relative_to(site)) for p in pages]
    for part in ("tutorial/demo", "reference/cli", "reference/templates", "reference/api",
                 "explanation/architecture", "explanation/chance", "changelog"):
        assert (site / part / "index.html").is_file(), part
    assert (site / "figures" / "architecture.png").is_file()


def test_every_command_is_in_the_command_reference(site):
    page = text_of(site / "reference" / "cli" / "index.html")
    assert "Sentinel" not in page  # click's "no default" marker is shown as no default
    missing = [name for name in command_names(cli) if name not in page]
    assert not missing, f"commands missing from the command reference: {missing}"
    assert set(cli.commands) >= {"ingest", "query", "link", "serve"}  # the group is the real one, not empty


def test_every_template_is_in_the_template_reference(site):
    page = (site / "reference" / "templates" / "index.html").read_text(encoding="utf-8")
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    found = templates()
    assert len(found) >= 10
    for name, template in found.items():
        assert f'id="{name}"' in page, f"template {name} has no section"
        for param in template.params:
            assert param.name in text, f"parameter {param.name} of {name} is not on the page"
        assert template.columns[0] in text


def test_the_api_reference_is_generated_from_docstrings(site):
    page = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("query", "cypher", "link", "show"):
        assert f'id="flowdb.api.{name}"' in page, name
    assert "&gt;&gt;&gt;" not in page and "<blockquote>" not in page  # doctest lines are code, not quotes


def test_the_site_loads_nothing_from_the_network(site):
    for page in site.rglob("*.html"):
        content = page.read_text(encoding="utf-8")
        assert "fonts.googleapis.com" not in content, page
        assert not re.search(r"<script[^>]+src=\"https?://", content), page
