import pytest
from click.testing import CliRunner
from PIL import Image

from flowdb.cli import cli
from flowdb.errors import FlowdbError
from flowdb.ingest import ingest
from flowdb.manifest import load_manifest
from flowdb.plots import flow_layout
from flowdb.queries import run_template


@pytest.fixture
def stored(db, planted_pack):
    ingest(load_manifest(planted_pack[0] / "manifest.toml"), db)
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
    assert result.exit_code == 1 and "the flow graph is empty" in result.output
    with pytest.raises(FlowdbError, match="no residual features"):
        from flowdb.plots import plot_origins
        plot_origins(run_template(stored, "origins", {"pack": "nosuch"}), tmp_path / "o.png", "nosuch")


def test_cypher_is_read_only_unless_write(stored):
    runner = CliRunner()
    result = runner.invoke(cli, ["cypher", "MATCH (f:Feature {pack: $p}) RETURN count(f) AS n",
                                 "-p", "p=planted", "--format", "csv"])
    assert result.exit_code == 0 and result.output == "n\n6144\n"
    refused = runner.invoke(cli, ["cypher", "CREATE (:Scratch)"])
    assert refused.exit_code == 1 and "use --write" in refused.output
    assert stored.read("MATCH (s:Scratch) RETURN count(s) AS n")[0]["n"] == 0
    assert runner.invoke(cli, ["cypher", "CREATE (:Scratch)", "--write"]).exit_code == 0
    assert stored.read("MATCH (s:Scratch) RETURN count(s) AS n")[0]["n"] == 1
