import json

import torch
from sae_lens import SAE

from conftest import TINY_DEMO
from flowdb.demo_pack import DemoPackSpec, build_demo_pack, sae_quality
from flowdb.hooks import capture
from flowdb.ingest import ingest
from flowdb.manifest import parse_manifest
from flowdb.texts import token_windows

SPEC = DemoPackSpec(**TINY_DEMO)


def test_pack_is_saelens_format_with_quality(tiny_pack):
    out, quality = tiny_pack
    assert len(quality) == 6 and set(quality["module"]) == {"res", "mlp", "att"}
    assert (quality["l0"] <= SPEC.k).all() and (quality["dead_fraction"] < 0.9).all()
    assert (quality["explained_variance"] > 0.3).all(), quality
    sae = SAE.load_from_disk(str(out / "saes" / "mlp" / "layer_3"))
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_mlp_out" and sae.W_dec.shape == (256, 576)
    assert json.loads((out / "spec.json").read_text())["width"] == 256
    again_out, again = build_demo_pack(SPEC, show_progress=False)  # cached: no model needed
    assert again.equals(quality)


def test_each_sae_reconstructs_its_own_hook_best(tiny_pack, smollm2):
    """The mapping test: an SAE explains activations at its hook far better than at the
    neighbouring hook points of the same layer."""
    out, _ = tiny_pack
    model, tokenizer = smollm2
    windows = token_windows(tokenizer, "python-stdlib", 6, 64, seed=99)  # texts not trained on
    points = {"res": "blocks.3.hook_resid_post", "mlp": "blocks.3.hook_mlp_out",
              "att": "blocks.3.hook_attn_out", "pre": "blocks.3.hook_resid_pre"}
    with torch.no_grad(), capture(model, list(points.values())) as acts:
        model(windows)
    flat = {name: acts[hook][:, 1:].reshape(-1, 576) for name, hook in points.items()}
    for module, own in (("res", "res"), ("mlp", "mlp"), ("att", "att")):
        sae = SAE.load_from_disk(str(out / "saes" / module / "layer_3"))
        scores = {name: sae_quality(sae, x)["explained_variance"] for name, x in flat.items()}
        # One layer changes the residual stream little (that is what makes features
        # "translated"), so resid_pre is no foil for the residual SAE: the module
        # outputs are.
        others = [v for name, v in scores.items() if name != own and not (own == "res" and name == "pre")]
        assert scores[own] > max(others) + 0.2, (module, scores)


def test_demo_pack_ingests(tiny_pack, db, tmp_path):
    manifest_text = (
        'name = "smollm2-tiny"\nmodel = "smollm2-135m"\nlayers = [2, 3]\n[match]\nk = 5\n'
        + "".join(f'[modules.{m}]\npath = "{{flowdb_home}}/packs/smollm2-135m-demo/saes/{m}/layer_{{layer}}"\n'
                  for m in ("res", "mlp", "att")))
    import tomllib

    manifest = parse_manifest(tomllib.loads(manifest_text), tmp_path / "m.toml")
    report = ingest(manifest, db, show_progress=False)
    assert report.match_edges == 256 * 5 * 5  # layer 2: mlp, att; layer 3: res, mlp, att
    assert sum(report.categories.values()) == 2 * 256
