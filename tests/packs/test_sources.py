import json
import os

import numpy as np
import pytest

from flowdb.errors import PackError
from flowdb.packs.manifest import SourceRef
from flowdb.packs.sources import check_same_space, inspect, load_decoder
from flowdb.packs.synth import write_sae


def ref(kind, location, module="res", layer=0):
    return SourceRef(module, layer, kind, str(location))


def test_synth_sae_is_real_sae_lens_format(planted_pack):
    """sae-lens's own loader reads what synth writes, and we read the same W_dec."""
    from sae_lens import SAE

    directory = planted_pack[0] / "saes" / "mlp" / "layer_1"
    sae = SAE.load_from_disk(str(directory), device="cpu")
    info, w_dec = load_decoder(ref("path", directory, "mlp", 1))
    assert info.hook_name == "blocks.1.hook_mlp_out" == sae.cfg.metadata.hook_name
    np.testing.assert_array_equal(w_dec, sae.W_dec.detach().numpy())


def test_gemma_scope_npz(tmp_path):
    rng = np.random.default_rng(0)
    w_dec = rng.standard_normal((32, 16)).astype(np.float32)
    path = tmp_path / "params.npz"
    np.savez(path, W_enc=w_dec.T, W_dec=w_dec, b_enc=np.zeros(32), b_dec=np.zeros(16),
             threshold=np.ones(32))
    assert (inspect(ref("npz", path)).d_in, inspect(ref("npz", path)).d_sae) == (16, 32)
    np.testing.assert_array_equal(load_decoder(ref("npz", path))[1], w_dec)


def test_old_flat_cfg_uses_hook_point(tmp_path):
    write_sae(tmp_path / "s", np.eye(8, 64, dtype=np.float32) + 0.1, "ignored", "m")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    flat = {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "hook_point": "blocks.3.hook_resid_pre"}
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(flat))
    assert inspect(ref("path", tmp_path / "s")).hook_name == "blocks.3.hook_resid_pre"


@pytest.mark.parametrize("damage, message", [
    ("nan", "NaN/Inf in 1 row(s), first at feature 3"),
    ("zero", "1 all-zero row(s), first at feature 5"),
])
def test_degenerate_rows_are_named(tmp_path, damage, message):
    w_dec = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    if damage == "nan":
        w_dec[3, 7] = np.nan
    else:
        w_dec[5] = 0
    write_sae(tmp_path / "s", w_dec, "blocks.0.hook_resid_post", "m")
    with pytest.raises(PackError, match="layer 0 module res") as info:
        load_decoder(ref("path", tmp_path / "s"))
    assert message in str(info.value)


def test_truncated_weights_fail_at_inspection(tmp_path):
    write_sae(tmp_path / "s", np.ones((16, 64), np.float32), "h", "m")
    weights = tmp_path / "s" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(PackError, match="unreadable sae_weights.safetensors"):
        inspect(ref("path", tmp_path / "s"))


def test_cfg_shape_disagreeing_with_weights(tmp_path):
    write_sae(tmp_path / "s", np.ones((16, 64), np.float32), "h", "m")
    cfg_path = tmp_path / "s" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["d_sae"] = 17
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(PackError, match=r"W_dec has shape \[16, 64\] but cfg.json says"):
        inspect(ref("path", tmp_path / "s"))


def test_missing_directory(tmp_path):
    with pytest.raises(PackError, match="no such directory"):
        inspect(ref("path", tmp_path / "absent"))


def test_hook_z_attention_sae_is_refused_with_reason(tmp_path):
    write_sae(tmp_path / "att", np.ones((16, 48), np.float32), "blocks.0.attn.hook_z", "m")
    info = inspect(ref("path", tmp_path / "att", "att"))
    with pytest.raises(PackError, match="concatenated attention-head outputs"):
        check_same_space(info, residual_d_in=64)


def test_bfloat16_weights_are_read_as_float32(tmp_path):
    torch = pytest.importorskip("torch")  # the model extra; bfloat16 has no numpy dtype
    from safetensors.torch import save_file

    w_dec = np.random.default_rng(2).standard_normal((40, 24)).astype(np.float32)
    write_sae(tmp_path / "s", w_dec, "blocks.0.hook_resid_post", "m")
    rounded = torch.from_numpy(w_dec).bfloat16()
    save_file({"W_dec": rounded}, str(tmp_path / "s" / "sae_weights.safetensors"))
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))  # as sae-lens writes it
    rows = load_decoder(ref("path", tmp_path / "s"))[1]
    np.testing.assert_array_equal(rows[5:17], rounded.float().numpy()[5:17])
    np.testing.assert_array_equal(np.asarray(rows), rounded.float().numpy())


# Matches layer 1 of a two-layer residual pack with tiles of 8 rows, and prints this
# process's peak RSS before and after, in bytes. VmHWM, not ru_maxrss: a child's
# ru_maxrss starts from its parent's RSS at fork, here the test's arrays.
MATCH_ONE_LAYER = """
import re, sys
import numpy as np
from flowdb.flow.build import match_layer
from flowdb.packs.manifest import load_manifest
from flowdb.flow.matching import Matcher
from flowdb.packs.plan import make_plan

plan = make_plan(load_manifest(sys.argv[1]))
matcher = Matcher.for_device("cpu", query_tile=8, base_tile=8)
peak = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
before = peak()
layer = match_layer(plan, 1, matcher)
after = peak()
np.save(sys.argv[2], layer.indices["res"][:, 0])
print(before, after)
"""


def test_a_wide_decoder_is_never_whole_in_memory(tmp_path):
    """Two decoders of 128 MiB each (256 MiB files, with W_enc): matching one against the
    other in small tiles raises the matcher's peak RSS by far less than one decoder.
    Few rows and a wide d_in keep the search itself cheap."""
    import subprocess
    import sys

    rows, d = 256, 131072
    rng = np.random.default_rng(5)
    base = rng.standard_normal((rows, d), dtype=np.float32)
    planted = rng.permutation(rows)  # query i is a noisy copy of base row planted[i]
    queries = base[planted] + np.float32(0.1) * rng.standard_normal((rows, d), dtype=np.float32)
    for layer, w_dec in enumerate((base, queries)):
        write_sae(tmp_path / f"res_{layer}", w_dec, f"blocks.{layer}.hook_resid_post", "m")
    decoder_bytes = base.nbytes + queries.nbytes
    del base, queries
    manifest = tmp_path / "m.toml"
    manifest.write_text('name = "wide"\nmodel = "m"\nlayers = [0, 1]\n[match]\nk = 1\n'
                        f'[modules.res]\npath = "{tmp_path}/res_{{layer}}"\n')
    found = tmp_path / "top1.npy"
    # One thread: FAISS's thread pool costs more than it gains on tiles this small.
    done = subprocess.run([sys.executable, "-c", MATCH_ONE_LAYER, str(manifest), str(found)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split()[-2:])
    assert (np.load(found) == planted).all()  # it did search both decoders
    assert after - before < decoder_bytes / 4, (before, after, decoder_bytes)
