"""Issue 8: answers a researcher can trust. Lineage stops where the build's own
thresholds stop it; feature references resolve or fail naming what exists;
parameters are checked alike from Python and the CLI; experiments run from the
stored build and refuse SAEs or manifests that changed."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

import flowdb
from flowdb.cli import cli
from flowdb.errors import QueryError, StaleBuildError
from flowdb.packs.manifest import load_manifest
from flowdb.store.ingest import ingest
from flowdb.store.templates import run_template
from helpers import ReferenceGraph, brute_force_edges


def build_two_packs(db, folder, pack_dir):
    """The planted pack (k = 2), plus the same SAEs as pack planted-np with Neuronpedia sources."""
    ingest(load_manifest(pack_dir / "manifest.toml", k=2), db)
    text = (pack_dir / "manifest.toml").read_text().replace('name = "planted"', 'name = "planted-np"')
    for module in ("res", "mlp", "att"):  # each module its own Neuronpedia source
        text = text.replace(f'"saes/{module}/layer_{{layer}}"\n',
                            f'"{pack_dir}/saes/{module}/layer_{{layer}}"\nneuronpedia = "{{layer}}-planted-{module}"\n')
    named = folder / "np.toml"
    named.write_text(text)
    ingest(load_manifest(named), db)


@pytest.fixture(scope="module")
def reference(planted_pack):
    # The manifest's thresholds (0.5 everywhere) are above chance in d 256: the build keeps them.
    return ReferenceGraph("planted", brute_force_edges(planted_pack[0], layers=4, k=2), t_res=0.5, t_mod=0.5)


@pytest.fixture
def graph(shared_graph, planted_pack, reference):
    """build_two_packs' graph, built once and shared: every test here that takes it only reads."""
    return shared_graph(build_two_packs, planted_pack[0]), reference


def _seeds(reference, category, layer=3, n=3):
    return sorted(k for k, c in reference.category.items() if c == category and k.split("/")[1] == str(layer))[:n]


def test_a_newborn_features_lineage_stops_at_it(graph):
    db, reference = graph
    for seed in _seeds(reference, "newborn"):
        frame = run_template(db, "lineage", {"feature": seed})
        assert set(frame["step_key"]) == {seed}, "lineage crossed a residual edge below the build's t_res"
        assert "residual" not in set(frame["kind"])
        assert {(r.pred_key, r.step_key, r.kind) for r in frame.itertuples()} == \
            reference.lineage_edges(seed, 0.5, 0.5, 1)
        assert "stored with the build (auto: fixed)" in frame.attrs["thresholds"]
        everything = run_template(db, "lineage", {"feature": seed, "every_edge": True})
        assert everything["depth"].max() == 3  # the chance-level chain back to layer 0
        assert {(r.pred_key, r.step_key, r.kind) for r in everything.itertuples()} == \
            reference.lineage_edges(seed, -2.0, -2.0, 1)
        assert "no thresholds" in everything.attrs["thresholds"]


def test_descendants_and_flow_graph_follow_the_stored_thresholds(graph):
    db, reference = graph
    for seed in _seeds(reference, "translated", layer=1):
        frame = run_template(db, "descendants", {"feature": seed})
        assert set(frame["child_key"]) == reference.descendants(seed, 0.5, 0.5, 1)
        flow = run_template(db, "flow-graph", {"feature": seed})
        nodes, _ = reference.flow_graph(seed, 0.5, 0.5, 1)
        assert set(flow.loc[flow["element"] == "node", "key"]) == nodes


def test_given_thresholds_are_said_so(graph):
    db, _ = graph
    frame = run_template(db, "lineage", {"feature": "planted/3/res/0", "t_res": 0.3})
    assert frame.attrs["thresholds"].startswith("t_res=0.3 given; otherwise the thresholds stored")


@pytest.mark.parametrize("reference, message", [
    ("planted/3/res/9999", "res at layer 3 of pack 'planted' has indexes 0-511"),
    ("planted/7/res/0", "pack 'planted' has layers 0-3"),
    ("planted/3/xyz/0", "has modules att, mlp, res at layer 3"),
    ("plantd/3/res/0", "no pack named 'plantd'; stored packs: planted, planted-np"),
    ("planted-model/3-planted-res/600", "index 600 is beyond the SAE's width 512"),
    ("planted-model/3-nosuch/1", "no stored pack has Neuronpedia source planted-model/3-nosuch"),
    ("3/res", "is not a feature reference"),
])
def test_a_reference_that_names_nothing_says_what_exists(graph, reference, message):
    db, _ = graph
    with pytest.raises(QueryError) as info:
        run_template(db, "lineage", {"feature": reference})
    assert message in str(info.value) and "\n" not in str(info.value)
    result = CliRunner().invoke(cli, ["query", "lineage", "-p", f"feature={reference}"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and message in result.output


@pytest.mark.parametrize("reference", [
    "https://www.neuronpedia.org/planted-model/2-planted-res/7",
    "planted-model/2-planted-res/7",
    "planted-np/2/res/7",
])
def test_neuronpedia_references_resolve(graph, reference):
    db, _ = graph
    frame = run_template(db, "lineage", {"feature": reference, "every_edge": True})
    assert frame["step_key"].iloc[0] == "planted-np/2/res/7"


def test_parameter_types_are_checked_alike_from_python(graph):
    db, _ = graph
    for bad in ({"max_rank": 1.5}, {"max_rank": True}, {"t_res": "0.5x"}, {"every_edge": 1}):
        with pytest.raises(QueryError, match="must be"):
            flowdb.query("lineage", db=db, feature="planted/3/res/0", **bad)
    result = CliRunner().invoke(cli, ["query", "lineage", "-p", "feature=planted/3/res/0", "-p", "max_rank=1.5"])
    assert result.exit_code == 1 and "max_rank must be int" in result.output


@pytest.fixture
def copied_tiny(tiny_pack, db, tmp_path):
    """The tiny SmolLM2 demo pack copied to tmp_path and ingested from there as "tinycopy"."""
    saes = tmp_path / "saes"
    shutil.copytree(tiny_pack[0] / "saes", saes)
    manifest = tmp_path / "tinycopy.toml"
    manifest.write_text('name = "tinycopy"\nmodel = "smollm2-135m"\nlayers = [2, 3]\n[match]\nk = 5\n' + "".join(
        f'[modules.{m}]\npath = "saes/{m}/layer_{{layer}}"\n' for m in ("res", "mlp", "att")))
    ingest(load_manifest(manifest), db)
    return tmp_path, manifest


def test_experiments_run_from_the_stored_build_anywhere(copied_tiny, db, tmp_path_factory, monkeypatch):
    from flowdb.analysis.pack_model import open_pack

    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    pack = open_pack(db, "tinycopy")
    assert pack.sae(3, "res").cfg.d_sae > 0
    assert pack.plan.sae(3, "mlp").ref.location == str(copied_tiny[0] / "saes" / "mlp" / "layer_3")


EXPERIMENTS = [
    ("groups", "tinycopy", "--samples", "2", "--no-progress"),
    ("validate", "deactivation", "tinycopy", "--layers", "3", "--samples", "2", "--no-progress"),
    ("steer", "tinycopy", "--seed-feature", "tinycopy/3/res/0", "--max-new-tokens", "2"),
    ("labels", "contexts", "tinycopy", "--windows", "2", "--no-progress"),
]


@pytest.mark.parametrize("command", EXPERIMENTS, ids=lambda c: c[0])
def test_experiments_refuse_a_changed_sae_file(copied_tiny, command):
    weights = copied_tiny[0] / "saes" / "mlp" / "layer_3" / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # same size, other weights
    weights.write_bytes(bytes(data))
    result = CliRunner().invoke(cli, list(command))
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "changed since pack 'tinycopy' was built" in result.output and "layer_3" in result.output


@pytest.mark.parametrize("command", EXPERIMENTS, ids=lambda c: c[0])
def test_experiments_refuse_an_edited_manifest(copied_tiny, command):
    manifest = copied_tiny[1]
    manifest.write_text(manifest.read_text().replace("layers = [2, 3]", "layers = [2, 2]"))
    result = CliRunner().invoke(cli, list(command))
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert f"manifest {manifest} changed since pack 'tinycopy' was built" in result.output


def test_stale_build_is_a_flowdb_error():
    assert issubclass(StaleBuildError, flowdb.FlowdbError)
