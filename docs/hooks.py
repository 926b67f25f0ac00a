"""mkdocs hook: the query-template reference, written at build time from queries/*.cypher.

Each template's header (name, answers, params, columns, feature, choices) is read by
flowdb's own parser, flowdb.store.templates.templates(), the one the CLI and the Python
API use, so the page cannot drift from the files. Named in mkdocs.yml under `hooks:`.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

PAGE = "reference/templates.md"
MODULE_NAMES = {"res": "residual", "mlp": "MLP", "att": "attention"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(param) -> str:
    if param.required:
        return "**required**"
    if param.default is None:
        return "null"
    if isinstance(param.default, bool):
        return f"`{str(param.default).lower()}`"
    return f"`{param.default}`"


def render() -> str:
    from flowdb.store.templates import templates

    found = templates()
    out = [
        "# Query templates",
        "",
        "<!-- Generated at build time by docs/hooks.py from the headers of queries/*.cypher; "
        "edit the .cypher files, not this page. -->",
        "",
        f"flowdb ships {len(found)} Cypher templates in `queries/` (inside the wheel as "
        "`flowdb/queries/`). This page is generated, when the site is built, from their headers by "
        "flowdb's own parser (`flowdb.store.templates.templates()`), the one the CLI and the "
        "Python API read. Run one with `flowdb query NAME -p key=value ...` or "
        "`flowdb.query(NAME, key=value, ...)`; `flowdb query NAME --explain` prints the template "
        "and its header. Parameters go to Neo4j as Cypher parameters, never spliced into the text. "
        "How to use them: [Ask questions](../how-to/query.md).",
        "",
        "| template | answers |",
        "| --- | --- |",
    ]
    for name, template in found.items():
        out.append(f"| [`{name}`](#{name}) | {_cell(template.answers)} |")
    out.append("")
    for name, template in found.items():
        out += [f"## {name}", "", template.answers, ""]
        if template.feature_module:
            out += [f"The `feature` parameter must name a "
                    f"{MODULE_NAMES.get(template.feature_module, template.feature_module)} feature.", ""]
        if template.params:
            out += ["| parameter | type | default | values | meaning |", "| --- | --- | --- | --- | --- |"]
            for param in template.params:
                values = ", ".join(f"`{v}`" for v in param.choices)
                out.append(f"| `{param.name}` | {param.type} | {_default(param)} | {values} | {_cell(param.doc)} |")
            out.append("")
        else:
            out += ["No parameters.", ""]
        out += ["Columns: " + ", ".join(f"`{c}`" for c in template.columns) + ".", ""]
        example = " ".join(f"-p {p.name}=..." for p in template.params if p.required)
        out += ["```bash", f"flowdb query {name} {example}".rstrip(), "```", ""]
        source = Path(template.path).name
        body = template.cypher.rstrip()
        out += [f'??? note "The Cypher: `queries/{source}`"', "", "    ```cypher"]
        out += [f"    {line}" if line else "" for line in body.splitlines()]
        out += ["    ```", ""]
    return "\n".join(out)


def on_files(files, config):
    files.append(File.generated(config, PAGE, content=render()))
    return files


def on_page_content(html, page, config, files):
    """mkdocs-click 0.9 prints click 8.3's marker for "no default" (Sentinel.UNSET) in the
    Default column of its option tables; show that as no default at all."""
    if page.file.src_uri == "reference/cli.md":
        html = html.replace("<code>Sentinel.UNSET</code>", "&ndash;")
    return html
