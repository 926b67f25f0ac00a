
import pytest

from flowdb.errors import ManifestError
from flowdb.packs.manifest import load_manifest, render
from helpers import ROOT

INGEST = ROOT / "ingest"

GOOD = """
name = "p1"
model = "m"
layers = [0, 2]
[match]
k = 3
[modules.res]
path = "saes/res/layer_{layer}"
neuronpedia = "{layer+1}-res-x"
[modules.res.at.2]
path = "saes/res/final"
[modules.mlp]
npz = "scope/mlp/layer_{layer}/params.npz"
[modules.att]
release = "rel"
sae_id = "blocks.{layer}.hook_attn_out"
"""


def write(tmp_path, text):
    path = tmp_path / "m.toml"
    path.write_text(text)
    return path


def test_good_manifest_resolves_templates_and_overrides(tmp_path):
    manifest = load_manifest(write(tmp_path, GOOD))
    assert manifest.k == 3 and list(manifest.layers) == [0, 1, 2] and manifest.score == "decoder"
    assert load_manifest(write(tmp_path, GOOD.replace("k = 3", 'k = 3\nscore = "encoder"'))).score == "encoder"
    res1 = manifest.source("res", 1)
    assert res1.location == str((tmp_path / "saes/res/layer_1").resolve())
    assert res1.neuronpedia == "2-res-x"
    assert manifest.source("res", 2).location.endswith("saes/res/final")
    att = manifest.source("att", 0)
    assert (att.kind, att.location, att.sae_id) == ("release", "rel", "blocks.0.hook_attn_out")
    assert manifest.source("mlp", 2).location.endswith("scope/mlp/layer_2/params.npz")


@pytest.mark.parametrize("text, message", [
    ("extra = 1\n" + GOOD, "unknown key(s) 'extra' in the manifest; valid keys:"),
    (GOOD.replace('npz = "scope', 'path = "x"\nnpz = "scope'), "needs exactly one source"),
    (GOOD.replace("k = 3", "k = 11"), "k must be an integer from 1 to 10"),
    (GOOD.replace("k = 3", "k = 0"), "k must be an integer from 1 to 10"),
    (GOOD.replace("k = 3", 'k = 3\nscore = "cosine"'), "[match] score must be 'decoder' or 'encoder', got 'cosine'"),
    (GOOD.replace("k = 3", "k = 3\nscore = 1"), "[match] score must be 'decoder' or 'encoder', got 1"),
    (GOOD.replace('sae_id = "blocks', 'sae_idx = "blocks'), "unknown key(s) 'sae_idx'"),
    (GOOD.replace('name = "p1"', 'name = "a/b"'), "name 'a/b'"),
    (GOOD.replace("layers = [0, 2]", "layers = [3, 2]"), "layers must be [first, last]"),
    (GOOD.replace("[modules.res]", "[modules.resid]"), "unknown key(s) 'resid' in [modules]"),
    (GOOD.replace("{layer+1}", "{depth}"), "unknown template field {depth}"),
    (GOOD.replace("[match]", "[classify]\nt_res = 2.0\n[match]"),
     "t_res in [classify]: input should be less than or equal to 1"),
    (GOOD.replace("[match]", "[classify]\nt_rez = 0.2\n[match]"), "unknown key(s) 't_rez'"),
    ("name = [", "invalid TOML"),
])
def test_bad_manifest_is_one_clear_error(tmp_path, text, message):
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(tmp_path / "absent.toml")


def test_render_offsets():
    assert render("blocks.{layer+1}.hook_resid_pre/{layer-1}/{layer}", 5, "x") == "blocks.6.hook_resid_pre/4/5"


@pytest.mark.parametrize("path", sorted(INGEST.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_manifests_name_real_releases(path):
    """Every release and sae_id a shipped manifest names exists in sae-lens's registry;
    local sources point where `flowdb demo-pack build` writes packs."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from flowdb.settings import flowdb_home

    registry = get_pretrained_saes_directory()
    manifest = load_manifest(path)
    for ref in manifest.sources():
        if ref.kind != "release":
            assert ref.location.startswith(str(flowdb_home() / "packs" / manifest.name)), ref.location
            continue
        assert ref.location in registry, ref.location
        lookup = registry[ref.location]
        assert ref.sae_id in lookup.saes_map, (ref.location, ref.sae_id)
        if ref.neuronpedia:  # our Neuronpedia source agrees with sae-lens's
            assert lookup.neuronpedia_id[ref.sae_id] == f"{manifest.model}/{ref.neuronpedia}"


def test_the_real_manifests_are_shipped():
    names = {p.stem for p in INGEST.glob("*.toml")}
    assert {"gemma-2-2b-gemmascope-16k", "llama-3.1-8b-llamascope", "gpt2-small-jb-oai",
            "smollm2-135m-demo", "gemma-2-2b-gemmascope-res-16k", "gemma-2-2b-gemmascope-res-65k",
            "gemma-2-2b-gemmascope-res-1m", "gemma-2-9b-gemmascope-res-16k",
            "gemma-2-9b-it-gemmascope-res-16k"} <= names


# Pairs shipped for `flowdb link`: both read the same hook and d_in at every common layer.
LINK_PAIRS = [("gemma-2-2b-gemmascope-res-16k", "gemma-2-2b-gemmascope-res-65k"),
              ("gemma-2-2b-gemmascope-res-16k", "gemma-2-2b-gemmascope-res-1m"),
              ("gemma-2-9b-gemmascope-res-16k", "gemma-2-9b-it-gemmascope-res-16k")]


@pytest.mark.parametrize("pair", LINK_PAIRS, ids="|".join)
def test_link_manifests_read_the_same_place(pair):
    """Per sae-lens's registry, both sides of a pair are residual Gemma Scope SAEs of
    their manifest's model, at the layer each manifest names, and the second side's
    layers are all in the first's."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    registry = get_pretrained_saes_directory()
    a, b = (load_manifest(INGEST / f"{name}.toml") for name in pair)
    assert set(a.modules) == set(b.modules) == {"res"}
    assert set(b.layers) <= set(a.layers)
    for manifest in (a, b):
        for layer in b.layers:
            ref = manifest.source("res", layer)
            lookup = registry[ref.location]
            assert lookup.repo_id.endswith("-res") and lookup.model == manifest.model
            assert lookup.saes_map[ref.sae_id].split("/")[0] == f"layer_{layer}"
