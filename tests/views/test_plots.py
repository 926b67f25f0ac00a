import json
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import build_planted
from flowdb.cli import cli
from flowdb.errors import FlowdbError
from flowdb.store.templates import run_template
from flowdb.views.plots import flow_layout, plot_flow


@pytest.fixture
def stored(planted_graph):
    """The planted pack, built once and shared: only for tests that do not write."""
    return planted_graph


@pytest.fixture
def writable(db, planted_pack):
    """The planted pack in a database of the test's own, for a test that writes."""
    build_planted(db, None, planted_pack[0])
    return db


def test_layout_puts_layers_on_x_and_modules_apart(stored):
    graph = run_template(stored, "flow-graph", {"feature": "planted/2/res/1", "t_res": 0.0, "t_mod": 0.0})
    layout = flow_layout(graph)
    for node in layout.nodes.itertuples():
        assert node.x == pytest.approx(node.layer if node.module == "res" else node.layer - 0.4)
        assert (node.y > 0) if node.module == "mlp" else (node.y < 0) if node.module == "att" else True
    assert len(layout.edges) == (graph["element"] == "edge").sum()


@pytest.mark.parametrize("suffix", [".png", ".svg", ".html"])
def test_plot_commands_write_pictures(stored, tmp_path, suffix):
    runner = CliRunner()
    flow = tmp_path / f"flow{suffix}"
    origins = tmp_path / f"origins{suffix}"
    assert runner.invoke(cli, ["plot", "flow", "planted/3/res/1", "--out", str(flow)]).exit_code == 0
    assert runner.invoke(cli, ["plot", "origins", "planted", "--out", str(origins)]).exit_code == 0
    for path in (flow, origins):
        if suffix == ".png":
            width, height = Image.open(path).size
            assert width > 400 and height > 250
        elif suffix == ".svg":
            assert path.read_text().lstrip().startswith("<?xml") and "<svg" in path.read_text()
        else:
            text = path.read_text()
            assert "plotly" in text and ("planted/3/res/1" in text or "translated" in text)


def test_plot_errors(stored, tmp_path):
    result = CliRunner().invoke(cli, ["plot", "flow", "planted/3/res/1", "--out", str(tmp_path / "x.jpg")])
    assert result.exit_code == 1 and "pictures are written as .png, .svg, .html" in result.output
    result = CliRunner().invoke(cli, ["plot", "flow", "planted/99/res/1", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "no feature 'planted/99/res/1': pack 'planted' has layers 0-3" in result.output
    with pytest.raises(FlowdbError, match="no pack named 'nosuch'.*stored packs: planted"):
        run_template(stored, "origins", {"pack": "nosuch"})
    from flowdb.views.plots import plot_origins

    with pytest.raises(FlowdbError, match="no residual features"):
        plot_origins(run_template(stored, "origins", {"pack": "planted"}).iloc[0:0], tmp_path / "o.png", "planted")


def test_cypher_is_read_only_unless_write(writable):
    runner = CliRunner()
    result = runner.invoke(cli, ["cypher", "MATCH (f:Feature {pack: $p}) RETURN count(f) AS n",
                                 "-p", "p=planted", "--format", "csv"])
    assert result.exit_code == 0 and result.output == "n\n6144\n"
    refused = runner.invoke(cli, ["cypher", "CREATE (:Scratch)"])
    assert refused.exit_code == 1 and "use --write" in refused.output
    assert writable.read("MATCH (s:Scratch) RETURN count(s) AS n")[0]["n"] == 0
    assert runner.invoke(cli, ["cypher", "CREATE (:Scratch)", "--write"]).exit_code == 0
    assert writable.read("MATCH (s:Scratch) RETURN count(s) AS n")[0]["n"] == 1


# --- what a researcher reads off a flow graph ----------------------------------------------

URL = "https://www.neuronpedia.org/m/{layer}-res-x/{index}"
COLUMNS = ["element", "key", "layer", "module", "index", "category", "label", "url", "role",
           "source", "target", "kind", "cosine", "status"]


def _graph(nodes, edges) -> pd.DataFrame:
    """A frame shaped like the flow-graph template's answer with its edges marked (NaN where the
    database has nothing); an edge given without a status has none."""
    rows = [["node", key, int(key.split("/")[1]), key.split("/")[2], int(key.split("/")[3]), category, label,
             url, role, None, None, None, None, None] for key, category, label, url, role in nodes]
    rows += [["edge", None, int(target.split("/")[1]), None, None, None, None, None, None, source, target,
              kind, cosine, status[0] if status else None] for source, target, kind, cosine, *status in edges]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["index"] = frame["index"].astype("Int64")
    return frame


LONG = "docstrings that describe the return values of functions in the standard library, often over many lines"
NODES = [
    ("p/1/res/4", "translated", LONG, URL.format(layer=1, index=4), "ancestor"),
    ("p/2/res/9", "processed", float("nan"), URL.format(layer=2, index=9), "seed"),
    ("p/2/mlp/3", float("nan"), None, float("nan"), "input"),
    ("p/2/att/8", float("nan"), "keywords <def>", None, "input"),
    ("p/3/res/2", "translated", None, None, "descendant"),
]
EDGES = [("p/1/res/4", "p/2/res/9", "residual", 0.93, "threshold"),
         ("p/2/mlp/3", "p/2/res/9", "mlp", 0.41, "above-chance"),
         ("p/2/att/8", "p/2/res/9", "attention", 0.17, "chance"),
         ("p/2/res/9", "p/3/res/2", "residual", 0.66, "threshold")]
DASH = {"threshold": "solid", "above-chance": "dash", "chance": "dot"}  # as the explorer's flow.js draws them
SYMBOL = {"translated": "circle", "processed": "diamond", "newborn": "star", "from-nowhere": "x"}


def _edge_traces(data) -> dict[str, dict]:
    """The figure's edges, by "SOURCE → TARGET": lines ending in an arrowhead."""
    return {t["name"]: t for t in data if t.get("mode") == "lines+markers"}


def _node_traces(data) -> dict[str, dict]:
    """The figure's node markers, by module name (the traces that carry links)."""
    return {t["name"]: t for t in data if "customdata" in t}


def _figure(page: str) -> tuple[list, dict]:
    """The data and layout that the HTML page hands to Plotly.newPlot."""
    decoder = json.JSONDecoder()
    rest = page[page.index("Plotly.newPlot(") + len("Plotly.newPlot("):]
    _, end = decoder.raw_decode(rest.lstrip())  # the div id
    rest = rest.lstrip()[end:].lstrip().removeprefix(",").lstrip()
    data, end = decoder.raw_decode(rest)
    layout, _ = decoder.raw_decode(rest[end:].lstrip().removeprefix(",").lstrip())
    return data, layout


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_html_flow_graph_shows_cosines_arrows_and_links(tmp_path):
    out = plot_flow(_graph(NODES, EDGES), tmp_path / "flow.html", "flow graph of p/2/res/9 (t_res 0.5, t_mod 0.15)")
    page = out.read_text()
    data, layout = _figure(page)
    annotations = layout["annotations"]
    arrows = _edge_traces(data)
    assert len(arrows) == len(EDGES)
    assert {(*a["x"], *a["y"]) for a in arrows.values()} == {
        (1.0, 2.0, 0.0, 0.0), (1.6, 2.0, 1.0, 0.0), (1.6, 2.0, -1.0, 0.0), (2.0, 3.0, 0.0, 0.0)}
    # an arrowhead at the feature's end only, turned along the line
    assert all(a["marker"]["symbol"] == "arrow" and a["marker"]["angleref"] == "previous"
               and a["marker"]["size"][0] == 0 < a["marker"]["size"][1] for a in arrows.values())
    # each edge's line style says where it stands against its layer's build, and the legend says so
    assert {name: a["line"]["dash"] for name, a in arrows.items()} == {
        f"{source} → {target}": DASH[status] for source, target, _, _, status in EDGES}
    legend = [t["name"] for t in data if t.get("showlegend", True)]
    assert {"solid", "dashed", "dotted"} == {name.split(":")[0] for name in legend if ":" in name}
    texts = [a["text"] for a in annotations]
    for cosine in ("0.93", "0.41", "0.17", "0.66"):
        assert cosine in texts
    # no "nan" anywhere the page's figure says something
    assert not [s for s in _strings([data, layout]) if re.search(r"\bnan\b", s, re.I)]
    assert not re.search(r"\bnan\b", page[page.index("Plotly.newPlot("):], re.I)
    # a node with a URL links to it (its name in the label, and a click on its marker); others do not
    seed_url, mlp_label = URL.format(layer=2, index=9), next(t for t in texts if t.startswith("2/mlp/3"))
    assert any(t.startswith(f'<a href="{seed_url}"') and ">2/res/9</a>" in t for t in texts)
    assert "href" not in mlp_label and "href" not in next(t for t in texts if "2/att/8" in t)
    markers = _node_traces(data)
    assert seed_url in markers["residual"]["customdata"] and markers["MLP"]["customdata"] == [""]
    assert "plotly_click" in page and "window.open" in page
    # labels are wrapped and capped; HTML in them is shown, not interpreted
    seedless = next(t for t in texts if ">1/res/4</a>" in t)
    assert seedless.count("<br>") == 3 and seedless.endswith("…") and LONG not in seedless
    assert "keywords &lt;def&gt;" in next(t for t in texts if "2/att/8" in t)
    # the seed is a legend entry of its own, a ring, and no module's marker carries it
    seed = next(t for t in data if t["name"] == "seed")
    assert seed["marker"]["symbol"] == "circle-open" and seed.get("showlegend", True)
    assert {m["marker"]["line"]["color"] for m in markers.values()} == {"white"}
    # a node's shape and first line give its category; inputs have none and are squares
    assert markers["residual"]["marker"]["symbol"] == [SYMBOL["translated"], SYMBOL["processed"],
                                                       SYMBOL["translated"]]
    assert markers["MLP"]["marker"]["symbol"] == markers["attention"]["marker"]["symbol"] == ["square"]
    assert seedless.split("<br>")[0].endswith("</a> · translated")
    assert next(t for t in texts if ">2/res/9</a>" in t).split("<br>")[0].endswith(" · processed")
    assert "t_res 0.5, t_mod 0.15" in layout["title"]["text"]


def test_layout_keeps_inputs_beside_the_features_they_feed():
    nodes = [("p/1/res/1", "translated", None, None, "seed"), ("p/1/res/2", "translated", None, None, "ancestor"),
             ("p/1/mlp/7", None, None, None, "input"), ("p/1/mlp/3", None, None, None, "input"),
             ("p/1/att/7", None, None, None, "input"), ("p/1/att/3", None, None, None, "input"),
             ("p/2/res/1", "translated", None, None, "descendant"), ("p/2/res/2", "translated", None, None,
                                                                    "descendant")]
    # by key order, res/1 sits below res/2; mlp/7 and att/7 feed res/2, the upper one
    edges = [("p/1/mlp/7", "p/1/res/2", "mlp", 0.3), ("p/1/mlp/3", "p/1/res/1", "mlp", 0.3),
             ("p/1/att/7", "p/1/res/2", "attention", 0.3), ("p/1/att/3", "p/1/res/1", "attention", 0.3),
             ("p/1/res/2", "p/2/res/1", "residual", 0.9), ("p/1/res/1", "p/2/res/2", "residual", 0.9)]
    y = dict(zip(*(flow_layout(_graph(nodes, edges)).nodes[c] for c in ("key", "y"))))
    assert y["p/1/res/2"] > y["p/1/res/1"]
    assert y["p/1/mlp/7"] > y["p/1/mlp/3"] > 0 > y["p/1/att/7"] > y["p/1/att/3"]  # no crossing
    assert y["p/2/res/1"] > y["p/2/res/2"]  # layer 2 follows its predecessors' rows


def test_static_flow_graph_grows_with_the_graph(tmp_path):
    short = plot_flow(_graph(NODES, EDGES), tmp_path / "short.png", "short")
    chain = [(f"p/{layer}/res/1", "translated", LONG, None, "seed" if layer == 0 else "descendant")
             for layer in range(12)]
    links = [(f"p/{layer}/res/1", f"p/{layer + 1}/res/1", "residual", 0.8) for layer in range(11)]
    long = plot_flow(_graph(chain, links), tmp_path / "long.png", "long")
    assert Image.open(long).size[0] > 2.5 * Image.open(short).size[0]
    for path in (short, long):
        assert Image.open(path).size[1] > 400


def test_flow_graph_from_the_database_has_no_nan_and_links(writable, tmp_path):
    writable.write("MATCH (s:SAE {module: 'res'}) "
                   "SET s.np_url = 'https://www.neuronpedia.org/m/' + s.layer + '-res-x/'")
    writable.write("MATCH (f:Feature {key: 'planted/3/res/1'}) SET f.label = $label", label=LONG)
    out = tmp_path / "flow.html"
    result = CliRunner().invoke(cli, ["plot", "flow", "planted/3/res/1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    data, layout = _figure(page)
    assert not [s for s in _strings([data, layout]) if re.search(r"\bnan\b", s, re.I)]
    texts = [a["text"] for a in layout["annotations"]]
    assert any(t.startswith('<a href="https://www.neuronpedia.org/m/3-res-x/1"') for t in texts)
    assert not any("href" in t for t in texts if "/mlp/" in t or "/att/" in t)  # no URLs for them
    graph = run_template(writable, "flow-graph", {"feature": "planted/3/res/1"})
    edges = graph[graph["element"] == "edge"]
    assert len(_edge_traces(data)) == len(edges)
    assert {f"{c:.2f}" for c in edges["cosine"]} <= set(texts)


def test_matplotlib_only_pictures_refuse_html(tmp_path):
    import pandas as pd

    from flowdb.errors import FlowdbError
    from flowdb.views.plots import plot_budget_curve, plot_steering_comparison

    with pytest.raises(FlowdbError, match=r"pictures are written as \.png, \.svg$"):
        plot_budget_curve(pd.DataFrame(), tmp_path / "curve.html")
    with pytest.raises(FlowdbError, match=r"pictures are written as \.png, \.svg$"):
        plot_steering_comparison(pd.DataFrame(), tmp_path / "steering.html", "t")


# --- marks against the build, and graphs too big to draw --------------------------------------

def _expected_statuses(db, graph: pd.DataFrame) -> dict[str, str]:
    """Each edge's status from the stored SAE thresholds and chance levels of its target's layer."""
    levels = pd.DataFrame(db.read(
        "MATCH (s:SAE {pack: 'planted', module: 'res'}) RETURN s.layer AS layer, s.t_res AS t_res, "
        "s.t_mlp AS t_mlp, s.t_att AS t_att, s.chance_res AS chance_res, s.chance_mlp AS chance_mlp, "
        "s.chance_att AS chance_att"))
    edges = graph[graph["element"] == "edge"].merge(levels, on="layer")
    place = edges["kind"].map({"residual": "res", "mlp": "mlp", "attention": "att"})
    threshold = np.array([edges.at[i, f"t_{p}"] for i, p in place.items()], dtype=float)
    chance = np.array([edges.at[i, f"chance_{p}"] for i, p in place.items()], dtype=float)
    status = np.where(edges["cosine"] >= threshold, "threshold",
                      np.where(edges["cosine"] > chance, "above-chance", "chance"))
    return dict(zip(edges["source"] + " → " + edges["target"], status))


def test_flow_edges_are_marked_against_their_layers_build(writable, tmp_path):
    from flowdb.explorer.data import EdgeFilter, flow

    params = {"feature": "planted/3/res/1", "t_res": 0.0, "t_mod": 0.0}
    graph = run_template(writable, "flow-graph", params)
    # the build's thresholds raised just above the weakest edge that passed them, at its layer:
    # that edge is only above chance now, stronger ones still pass
    passed = graph[(graph["element"] == "edge") & (graph["cosine"] >= 0.5)].sort_values("cosine")
    writable.write("MATCH (s:SAE {pack: 'planted', module: 'res', layer: $layer}) "
                 "SET s.t_res = $t, s.t_mlp = $t, s.t_att = $t",
                 layer=int(passed["layer"].iloc[0]), t=float(passed["cosine"].iloc[0]) + 1e-6)
    expected = _expected_statuses(writable, graph)
    assert set(expected.values()) == {"threshold", "above-chance", "chance"}
    out = tmp_path / "flow.html"
    result = CliRunner().invoke(cli, ["plot", "flow", "planted/3/res/1", "--t-res", "0", "--t-mod", "0",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    data, _ = _figure(out.read_text())
    assert {name: t["line"]["dash"] for name, t in _edge_traces(data).items()} == {
        name: DASH[status] for name, status in expected.items()}
    # the explorer's flow view marks the same edges the same way
    view = flow(writable, "planted/3/res/1", EdgeFilter(t_res=0.0, t_mod=0.0), depth=3)
    assert {f"{e['source']} → {e['target']}": e["status"] for e in view["edges"]} == expected


def test_flow_nodes_show_their_categories(stored, tmp_path):
    out = tmp_path / "flow.html"
    result = CliRunner().invoke(cli, ["plot", "flow", "planted/3/res/1", "--every-edge", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data, layout = _figure(out.read_text())
    shown = {}
    for trace in _node_traces(data).values():
        keys = [re.match(r"<b>(.*?)</b>", text).group(1) for text in trace["hovertext"]]
        shown.update(zip(keys, trace["marker"]["symbol"]))
    stored_categories = {row["key"]: row["category"] for row in stored.read(
        "MATCH (f:Feature) WHERE f.key IN $keys RETURN f.key AS key, f.category AS category", keys=list(shown))}
    assert len(shown) > 5 and set(stored_categories) == set(shown)
    assert shown == {key: SYMBOL[c] if c else "square" for key, c in stored_categories.items()}
    assert {c for c in stored_categories.values() if c} >= {"newborn", "from-nowhere"}
    headlines = [a["text"].split("<br>")[0] for a in layout["annotations"]]
    for key, category in stored_categories.items():
        name = "/".join(key.split("/")[1:])
        line = next(h for h in headlines if h == name or h.startswith(name + " "))
        assert line == (f"{name} · {category}" if category else name)


def test_a_flow_graph_too_big_to_read_is_refused(stored, tmp_path, monkeypatch):
    import flowdb.views.marks

    graph = run_template(stored, "flow-graph", {"feature": "planted/3/res/1", "every_edge": True})
    n_nodes, n_edges = (graph["element"] == "node").sum(), (graph["element"] == "edge").sum()
    monkeypatch.setattr(flowdb.views.marks, "FLOW_NODE_CAP", n_nodes - 1)
    out = tmp_path / "big.png"
    result = CliRunner().invoke(cli, ["plot", "flow", "planted/3/res/1", "--every-edge", "--out", str(out)])
    assert result.exit_code == 1 and not out.exists()
    assert "Traceback" not in result.output
    [message] = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert f"{n_nodes} features and {n_edges} edges" in message and f"at most {n_nodes - 1} features" in message
    assert all(hint in message for hint in ("--max-rank", "--t-res", "--t-mod", "--every-edge"))


def test_flow_pictures_at_the_node_cap_stay_bounded(tmp_path):
    column = [(f"p/1/mlp/{i}", None, LONG, None, "input") for i in range(59)]
    nodes = [("p/1/res/0", "newborn", None, None, "seed"), *column]
    links = [(key, "p/1/res/0", "mlp", 0.2, "above-chance") for key, *_ in column]
    size = Image.open(plot_flow(_graph(nodes, links), tmp_path / "cap.png", "at the cap")).size
    assert max(size) <= 8000 and min(size) > 400
    one_more = _graph([*nodes, ("p/1/att/0", None, None, None, "input")], links)
    with pytest.raises(FlowdbError, match=r"^the flow graph has 61 features and 59 edges.*at most 60 features"):
        plot_flow(one_more, tmp_path / "over.png", "over the cap")
    assert not (tmp_path / "over.png").exists()
