"""A circuit-tracer transcoder set as a pack's MLP module: read, planned, and refused in
one line naming the file and the field (no database: flowdb_store tests check that
nothing is stored)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file
from transcoder_sets import SCAN, planted_decoder, transcoder_manifest, write_transcoder_set

from flowdb.errors import FlowdbError, ManifestError, PackError
from flowdb.packs.manifest import SourceRef, load_manifest
from flowdb.packs.plan import BuildPlan, make_plan
from flowdb.packs.sources import SafetensorsRows, content_digest, load_decoder, load_encoder, load_sae

LAYERS = 4


@pytest.fixture(scope="module")
def tc_set(planted_pack, tmp_path_factory):
    return write_transcoder_set(planted_pack[0], tmp_path_factory.mktemp("tc") / "set", LAYERS)


def ref(set_dir, layer=1):
    return SourceRef("mlp", layer, "transcoders", str(set_dir))


def test_decoder_rows_are_the_files_read_a_slice_at_a_time(planted_pack, tc_set):
    info, rows = load_decoder(ref(tc_set, 2))
    assert isinstance(rows, SafetensorsRows)  # bounded memory: rows read on demand
    np.testing.assert_array_equal(np.asarray(rows), planted_decoder(planted_pack[0], "mlp", 2))
    assert (info.d_sae, info.d_in, info.hook_name, info.scan) == (512, 256, "blocks.2.hook_mlp_out", SCAN)
    np.testing.assert_array_equal(load_encoder(ref(tc_set, 2))[1],
                                  load_file(str(tc_set / "layer_2.safetensors"))["W_enc"])


def test_circuit_tracers_own_loader_reads_the_fixture_as_flowdb_does(tc_set):
    """The fixture is circuit-tracer's layout: its loader reads the same decoder."""
    from circuit_tracer.transcoder.single_layer_transcoder import load_relu_transcoder

    theirs = load_relu_transcoder(str(tc_set / "layer_1.safetensors"), 1, device="cpu",
                                  lazy_encoder=False, lazy_decoder=False)
    np.testing.assert_array_equal(theirs.W_dec.detach().numpy(), np.asarray(load_decoder(ref(tc_set))[1]))
    assert (theirs.d_transcoder, theirs.d_model) == (512, 256)


def test_plan_puts_the_set_in_the_mlp_slot(planted_pack, tc_set, tmp_path):
    plan = make_plan(load_manifest(transcoder_manifest(planted_pack[0], tc_set, tmp_path / "m.toml")))
    mlp = [s for s in plan.saes if s.ref.module == "mlp"]
    assert [s.ref.layer for s in mlp] == list(range(LAYERS))
    assert {(s.ref.kind, s.info.scan, s.info.d_in) for s in mlp} == {("transcoders", SCAN, 256)}
    again = BuildPlan.from_json(plan.to_json())  # the stored plan keeps the scan
    assert again.sae(3, "mlp").info.scan == SCAN and again.fingerprint() == plan.fingerprint()
    assert "scan" not in plan.sae(0, "res").to_json()  # SAE rows as they were
    # The digest follows the layer file and the config.
    before = content_digest(ref(tc_set, 0))
    assert before != content_digest(ref(tc_set, 1))


def test_a_set_without_scan_is_named_by_its_directory(planted_pack, tmp_path):
    """As circuit-tracer's load_transcoders_from_cache names a cached set."""
    set_dir = write_transcoder_set(planted_pack[0], tmp_path / "set", 1, scan=None)
    assert load_decoder(ref(set_dir, 0))[0].scan == str(set_dir)


def test_the_config_may_list_the_layer_files(planted_pack, tmp_path):
    set_dir = write_transcoder_set(planted_pack[0], tmp_path / "set", 2)
    (set_dir / "layer_1.safetensors").rename(set_dir / "mlp-1.safetensors")
    config = yaml.safe_load((set_dir / "config.yaml").read_text())
    (set_dir / "config.yaml").write_text(yaml.safe_dump(
        {**config, "transcoders": ["layer_0.safetensors", "mlp-1.safetensors"]}))
    np.testing.assert_array_equal(np.asarray(load_decoder(ref(set_dir, 1))[1]),
                                  planted_decoder(planted_pack[0], "mlp", 1))


def test_running_a_transcoder_is_refused_in_one_line(tc_set):
    with pytest.raises(PackError, match="running a transcoder on a model is not supported"):
        load_sae(ref(tc_set))


# --- refusals: each one line, naming the file and the field -------------------------------

def _config(**changes):
    def damage(set_dir, pack_dir):
        config = yaml.safe_load((set_dir / "config.yaml").read_text())
        config.update(changes)
        (set_dir / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}))
    return damage


def _tensors(layer, **changes):
    def damage(set_dir, pack_dir):
        path = set_dir / f"layer_{layer}.safetensors"
        tensors = load_file(str(path))
        tensors.update({k: v(tensors) for k, v in changes.items() if v is not None})
        save_file({k: v for k, v in tensors.items() if changes.get(k, 0) is not None}, str(path))
    return damage


def _narrow(set_dir, pack_dir):  # d_model 128 where the pack's residual SAEs have 256
    for layer in range(LAYERS):
        path = set_dir / f"layer_{layer}.safetensors"
        tensors = load_file(str(path))
        save_file({k: np.ascontiguousarray(v[..., :128]) if k in ("W_enc", "W_dec", "b_dec") else v
                   for k, v in tensors.items()}, str(path))


REFUSALS = {
    "cross-layer": (_config(model_kind="cross_layer_transcoder"),
                    "config.yaml: model_kind is cross_layer_transcoder; a cross-layer transcoder's decoders "
                    "write the MLP output of every later layer"),
    "other kind": (_config(model_kind="sae"), "config.yaml: model_kind must be 'transcoder_set', got 'sae'"),
    "output hook": (_config(feature_output_hook="hook_resid_post"),
                    "config.yaml: feature_output_hook is 'hook_resid_post'; a transcoder set stands in "
                    "the mlp slot only when it writes the MLP output (hook_mlp_out)"),
    "no output hook": (_config(feature_output_hook=None), "config.yaml: feature_output_hook must be a string"),
    "hf entry": (_config(transcoders=[f"hf://org/tc/layer_{i}.safetensors" for i in range(LAYERS)]),
                 "config.yaml: transcoders[0] is 'hf://org/tc/layer_0.safetensors'; flowdb reads local files only"),
    "npz entry": (_config(transcoders=[f"layer_{i}/params.npz" for i in range(LAYERS)]),
                  "config.yaml: transcoders[0] is 'layer_0/params.npz'; flowdb reads circuit-tracer's "
                  "safetensors layout only"),
    "short list": (_config(transcoders=["layer_0.safetensors"]),
                   "config.yaml: transcoders lists 1 layer file(s), none for layer 1"),
    "missing config": (lambda s, p: (s / "config.yaml").unlink(), "missing config.yaml"),
    "bad yaml": (lambda s, p: (s / "config.yaml").write_text("model_kind: [unclosed\n"),
                 "config.yaml (YAML: expected ',' or ']', but got '<stream end>' at line 2)"),
    "missing layer": (lambda s, p: (s / "layer_2.safetensors").unlink(),
                      "layer 2 module mlp (transcoders "),
    "W_enc transposed": (_tensors(3, W_enc=lambda t: np.ascontiguousarray(t["W_enc"].T)),
                         "layer_3.safetensors: W_enc has shape [256, 512] but W_dec [512, 256]; circuit-tracer "
                         "stores both as [d_transcoder, d_model]"),
    "no W_dec": (_tensors(1, W_dec=None), "layer_1.safetensors has no tensor W_dec"),
    "d_model": (_narrow, "d_in 128 differs from the residual SAEs' d_in 256"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_the_file_and_the_field(planted_pack, tmp_path, case):
    damage, message = REFUSALS[case]
    set_dir = write_transcoder_set(planted_pack[0], tmp_path / "set", LAYERS)
    damage(set_dir, planted_pack[0])
    manifest = transcoder_manifest(planted_pack[0], set_dir, tmp_path / "m.toml")
    with pytest.raises(PackError) as info:
        make_plan(load_manifest(manifest))
    line = str(info.value)
    assert "\n" not in line and message in line, line
    if case == "missing layer":
        assert line.endswith("missing layer_2.safetensors"), line


MANIFEST_REFUSALS = {
    "in res": ('[modules.res]\ntranscoders = "SET"\n[modules.mlp]\ntranscoders = "SET"\n',
               "[modules.res]: a transcoder set writes the MLP output (hook_mlp_out), so it goes in "
               "[modules.mlp] only"),
    "att override": ('[modules.res]\npath = "r"\n[modules.att]\npath = "a"\n[modules.att.at.1]\n'
                     'transcoders = "SET"\n', "[modules.att.at.1]: a transcoder set writes the MLP output"),
    "transcoders only": ('[modules.mlp]\ntranscoders = "SET"\n',
                         "[modules.res] is required: residual features are what gets matched (a transcoder "
                         "set fills [modules.mlp] beside residual SAEs)"),
    "two sources": ('[modules.res]\npath = "r"\n[modules.mlp]\npath = "m"\ntranscoders = "SET"\n',
                    "[modules.mlp] needs exactly one source (path, npz, transcoders, or release + sae_id); "
                    "found: path, transcoders"),
    "projected": ('[modules.res]\npath = "r"\n[modules.mlp]\ntranscoders = "SET"\nproject = "W_O"\n'
                  'project_model = "m"\n', "[modules.mlp]: project = \"W_O\" is for attention hook_z SAEs"),
}


@pytest.mark.parametrize("case", MANIFEST_REFUSALS)
def test_manifest_refusals(tmp_path, case):
    modules, message = MANIFEST_REFUSALS[case]
    path = tmp_path / "m.toml"
    path.write_text(f'name = "t"\nmodel = "m"\nlayers = [0, 1]\n{modules}')
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert isinstance(info.value, FlowdbError) and "\n" not in str(info.value)
    assert message in str(info.value), str(info.value)
