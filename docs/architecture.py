"""Draw flowdb's package layout: the stage subpackages and which imports which.

    .venv/bin/python docs/architecture.py            # writes docs/figures/architecture.png
    .venv/bin/python docs/architecture.py DIR        # the package in DIR (e.g. a `git archive HEAD flowdb` export)

Reads every .py file under flowdb/ with `ast` (imports inside functions and under
TYPE_CHECKING count, as in ../shared/tools/import_cycles.py), resolves each import to a
module of the package, and counts the module-to-module imports between stages. The
stages are stacked in the order data moves through them, bottom to top; every arrow
should point down. An arrow that points up (an import of a stage above) is drawn in red
on the left, and the script exits 1, so the picture cannot hide a layering break.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT / "flowdb"
OUT = ROOT / "docs" / "figures" / "architecture.png"

# Bottom to top: each stage may import only the stages below it.
STAGES = [
    ("root", "shared ground: errors, settings, files, the three modules, classification"),
    ("lm", "language models: loading, hooks on module outputs, texts"),
    ("packs", "manifests, SAE sources, build plans, planted and demo packs"),
    ("flow", "matching and classification into a flow atlas on disk (no Neo4j)"),
    ("store", "Neo4j: the managed server, the graph, templates, labels, bulk, links"),
    ("circuits", "attribution graphs (circuit-tracer JSON): checked, stored, exported"),
    ("analysis", "experiments on a model: groups, deactivation, steering, contexts"),
    ("views", "pictures and Neuronpedia graph JSON"),
    ("explorer", "flowdb serve: the web app, its JSON API, flowdb.show"),
    ("face", "import flowdb: query, cypher, link, show"),
    ("cli", "the flowdb command: parse options, call the library, print"),
]
FACE = {"flowdb", "flowdb.api"}  # the package's __init__ and what it re-exports
# One colour per stage: its box is a light tint, its imports are drawn in the full colour.
COLOURS = ["#606060", "#3f7fbf", "#1f4e9a", "#1a9850", "#e08214", "#8c510a",
           "#d6404d", "#9e6bb8", "#5e4fa2", "#808080", "#b8860b"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def stage_of(module: str) -> str:
    if module in FACE:
        return "face"
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()):
        stage = parts[1]
        return stage if stage in dict(STAGES) else "root"  # resources/: data, no code to speak of
    return "root"


def import_graph() -> tuple[dict[str, list[str]], dict[tuple[str, str], set[tuple[str, str]]]]:
    """Each stage's module names, and per (importer stage, imported stage) the module pairs."""
    files = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    members: dict[str, list[str]] = defaultdict(list)
    for module, path in files.items():
        stage = stage_of(module)
        shown = path.parent.name + "/" if path.name == "__init__.py" else path.stem
        if "resources" in path.parts:  # the managed server's Java sources: data, not code
            continue
        if stage in ("root", "face") or path.name != "__init__.py":
            members[stage].append(shown if stage != "face" else ("__init__" if module == "flowdb" else path.stem))
    pairs: dict[tuple[str, str], set[tuple[str, str]]] = defaultdict(set)
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    a, b = stage_of(module), stage_of(target)
                    if a != b:
                        pairs[a, b].add((module, target))
    return members, pairs


def draw(members, pairs) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import FancyBboxPatch

    level = {name: i for i, (name, _) in enumerate(STAGES)}
    n = len(STAGES)
    # Coordinates are inches: the figure is W x H inches and the axes fill it.
    box_x, box_w, box_h, gap = 0.55, 6.35, 0.98, 0.3
    step = box_h + gap
    top = 0.75
    width, height = 10.2, n * step + top + 0.2
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")

    def y_of(stage: str) -> float:  # bottom of the stage's box
        return 0.2 + level[stage] * step

    def tint(colour: str) -> tuple[float, float, float]:
        return tuple(1 - 0.28 * (1 - c) for c in to_rgb(colour))

    for i, (name, role) in enumerate(STAGES):
        y = y_of(name)
        ax.add_patch(FancyBboxPatch((box_x, y), box_w, box_h, boxstyle="round,pad=0,rounding_size=0.08",
                                    facecolor=tint(COLOURS[i]), edgecolor=COLOURS[i], linewidth=1.0))
        title = {"root": "flowdb/*.py", "face": "flowdb/__init__.py, api.py"}.get(name, f"flowdb/{name}/")
        ax.text(box_x + 0.12, y + box_h - 0.2, title, fontsize=12, fontweight="bold", va="center",
                family="DejaVu Sans Mono")
        ax.text(box_x + 0.12, y + box_h - 0.45, role, fontsize=9.5, va="center", style="italic",
                color="#303030")
        lines, line = [], ""
        for mod in sorted(members.get(name, [])):
            candidate = f"{line}  {mod}" if line else mod
            if len(candidate) > 78:
                lines.append(line)
                line = mod
            else:
                line = candidate
        lines.append(line)
        ax.text(box_x + 0.12, y + 0.1, "\n".join(lines), fontsize=8.8, va="bottom",
                family="DejaVu Sans Mono", color="#101010", linespacing=1.2)

    # Imports that point down: one lane each on the right, shorter spans nearer the boxes,
    # so nested spans never cross. Any import that points up: red, on the left.
    down = sorted(((a, b) for (a, b) in pairs if level[a] > level[b]),
                  key=lambda e: (level[e[0]] - level[e[1]], -level[e[0]]))
    up = [(a, b) for (a, b) in pairs if level[a] < level[b]]
    most = max(len(v) for v in pairs.values())
    leaving = defaultdict(list)
    arriving = defaultdict(list)
    for a, b in down:
        leaving[a].append(b)
        arriving[b].append(a)
    lane_x0, lane_w = box_x + box_w + 0.18, width - (box_x + box_w + 0.18) - 0.25
    lane_step = lane_w / max(len(down), 1)
    for lane, (a, b) in enumerate(down):
        # leave from the lower half of the importer's edge, ordered by target; arrive on the upper half
        # a box's edge: arrivals on top (from the nearest importer down), departures below
        slots_a = sorted(arriving[a], key=lambda s: -level[s]) + sorted(leaving[a], key=lambda s: -level[s])
        slots_b = sorted(arriving[b], key=lambda s: -level[s]) + sorted(leaving[b], key=lambda s: -level[s])
        ya = y_of(a) + box_h * (0.92 - 0.84 * (len(arriving[a]) + slots_a[len(arriving[a]):].index(b) + 0.5)
                                / len(slots_a))
        yb = y_of(b) + box_h * (0.92 - 0.84 * (slots_b.index(a) + 0.5) / len(slots_b))
        x = lane_x0 + lane_step * (lane + 0.5)
        colour = COLOURS[level[a]]
        lw = 0.8 + 3.0 * len(pairs[a, b]) / most
        ax.plot([box_x + box_w, x, x], [ya, ya, yb], color=colour, lw=lw, solid_capstyle="round",
                solid_joinstyle="round", alpha=0.9)
        ax.annotate("", xy=(box_x + box_w + 0.02, yb), xytext=(x, yb),
                    arrowprops=dict(arrowstyle="-|>,head_length=0.5,head_width=0.25", color=colour, lw=lw,
                                    shrinkA=0, shrinkB=0, alpha=0.9))
        ax.plot([box_x + box_w + 0.03], [ya], marker="o", ms=2.5 + lw, color=colour)
    for a, b in up:
        ax.annotate("", xy=(box_x, y_of(b) + box_h / 2), xytext=(box_x, y_of(a) + box_h / 2),
                    arrowprops=dict(arrowstyle="-|>", color="#d62728", lw=2.5,
                                    connectionstyle="arc3,rad=0.5"))

    ax.annotate("", xy=(0.28, y_of(STAGES[0][0]) + 0.1), xytext=(0.28, y_of(STAGES[-1][0]) + box_h - 0.1),
                arrowprops=dict(arrowstyle="-|>", color="#606060", lw=1.5))
    ax.text(0.17, (y_of(STAGES[0][0]) + y_of(STAGES[-1][0]) + box_h) / 2, "each stage imports only the stages below it",
            rotation=90, va="center", ha="center", fontsize=10, color="#404040")
    verdict = ("every import points down" if not up else f"{len(up)} import(s) point UP (red)")
    ax.text(box_x, height - 0.22, "flowdb's stages, bottom to top in the order data moves",
            fontsize=13, fontweight="bold", va="center")
    ax.text(box_x, height - 0.52,
            f"A line is an import from a stage to one below (dot: the importer, arrow: the imported); its "
            f"width is the number of\nmodule-to-module imports ({sum(len(v) for v in pairs.values())} in all). "
            f"{verdict[0].upper()}{verdict[1:]}.",
            fontsize=9.5, color="#202020", va="center", linespacing=1.2)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=120)
    plt.close(fig)
    return [f"{a} -> {b}" for a, b in up]


def main() -> int:
    members, pairs = import_graph()
    for (a, b), found in sorted(pairs.items()):
        print(f"{a:>9} -> {b:<9} {len(found):3d} module pairs")
    upward = draw(members, pairs)
    print(f"wrote {OUT.relative_to(ROOT)}")
    if upward:
        print("imports that point up: " + ", ".join(upward), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
