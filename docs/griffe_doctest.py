"""A griffe extension for the API reference (mkdocs.yml: mkdocstrings' `extensions`).

flowdb's docstrings are plain prose with doctest-style examples (`>>> flowdb.query(...)`)
and indented blocks after a line ending in a colon. Markdown would read `>>>` as three
nested quotes and fold an indented block into its paragraph, so this extension fences
both as code before mkdocstrings renders them. It changes only what the site shows,
never the docstrings in flowdb/.
"""

from __future__ import annotations

import griffe

# Google-style section titles: their indented bodies are griffe's to parse, not code.
SECTIONS = {"Args", "Arguments", "Parameters", "Returns", "Raises", "Yields", "Examples", "Example",
            "Attributes", "Note", "Notes", "Warning", "Warnings", "See Also"}


def fence(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            in_fence = not in_fence
            out.append(line)
            i += 1
            continue
        if in_fence:
            out.append(line)
            i += 1
            continue
        if stripped.startswith(">>>"):
            block = []
            while i < len(lines) and lines[i].strip().startswith((">>>", "...")):
                block.append(lines[i].strip()[4:])
                i += 1
            if out and out[-1].strip():
                out.append("")
            out += ["```python", *block, "```", ""]
            continue
        indent = len(line) - len(line.lstrip())
        if (stripped and indent == 0 and line.rstrip().endswith(":") and i + 1 < len(lines)
                and stripped[:-1] not in SECTIONS):
            nxt = lines[i + 1]
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) >= 2:
                out += [line, "", "```text"]
                i += 1
                block = []
                while i < len(lines) and (lines[i].strip() == "" or len(lines[i]) - len(lines[i].lstrip()) >= 2):
                    block.append(lines[i])
                    i += 1
                while block and not block[-1].strip():
                    block.pop()
                width = min(len(b) - len(b.lstrip()) for b in block if b.strip())
                out += [b[width:] for b in block] + ["```", ""]
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


class FenceExamples(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence(obj.docstring.value)
