"""hook_z SAEs projected through W_O: proved against the models' own forward passes.

A decoder row added to hook_z at one token changes that token's attention output
(hook_attn_out). Without a post-norm (SmolLM2, GPT-2) the change is exactly the
projected row. With Gemma 2's post-attention RMSNorm the change also rescales the
token's whole attention output (its RMS moves), so it agrees with the projection in
direction only up to the row's component along that output; the tests measure this
and check that it is the only departure.
"""

import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
import torch

from flowdb.errors import FlowdbError, PackError
from flowdb.lm.hooks import ARCHITECTURES, capture, intervene
from flowdb.packs.manifest import SourceRef
from flowdb.packs.projection import (
    SPECS,
    AttentionOutput,
    load_attention_output,
    project_hook_z,
    read_safetensors_header,
    read_safetensors_tensor,
)
from flowdb.packs.sources import SaeInfo, check_same_space
from helpers import serve

N_LAYERS = 2


def tiny_model(kind):
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=N_LAYERS,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        return LlamaForCausalLM(config).eval()
    if kind == "gemma2":
        # d_in 32 (4 heads x 8) against d_model 48, as Gemma 2 2B has 2048 against 2304
        config = Gemma2Config(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=N_LAYERS,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        model = Gemma2ForCausalLM(config).eval()
        with torch.no_grad():  # Gemma's norms start at weight 0 (gain 1): make the gain matter
            for block in model.model.layers:
                block.post_attention_layernorm.weight.normal_(0.0, 0.5)
        return model
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def hook_z(model, ids, layer):
    """hook_z at `layer` [pos, n_heads * head_dim], as flowdb.lm.hooks captures it."""
    name = f"blocks.{layer}.attn.hook_z"
    with torch.no_grad(), capture(model, [name]) as acts:
        model(ids)
    return acts[name][0].numpy()


def attn_out_with_rows(model, ids, layer, edits):
    """hook_attn_out at `layer` [batch, pos, d] without and with each edit (token, row):
    the row added to hook_z at the token, one edit per batch item."""
    z_hook, out_hook = f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out"
    batch = ids.repeat(len(edits), 1)

    def add(z):
        z = z.clone()
        for item, (token, row) in enumerate(edits):
            z[item, token] += torch.as_tensor(np.asarray(row, np.float32)).to(z.dtype)
        return z

    with torch.no_grad():
        with capture(model, [out_hook]) as base:
            model(batch)
        with intervene(model, {z_hook: add}), capture(model, [out_hook]) as edited:
            model(batch)
    return base[out_hook].numpy(), edited[out_hook].numpy()


def check_exact(model, ids, layer, w_dec, features, tokens):
    """The change of attn_out equals project_hook_z(row) at the token, nothing elsewhere.
    Returns the largest relative error (norm of the miss / norm of the projection)."""
    attention = load_attention_output(model, layer)
    projected = project_hook_z(w_dec, attention)
    z = hook_z(model, ids, layer)
    # rows as long as the token's own hook_z: changes as large as the output
    scales = [(f, t, np.linalg.norm(z[t]) / np.linalg.norm(w_dec[f])) for f in features for t in tokens]
    base, edited = attn_out_with_rows(model, ids, layer, [(t, c * w_dec[f]) for f, t, c in scales])
    worst = 0.0
    for item, (feature, token, scale) in enumerate(scales):
        change = edited[item] - base[item]
        expected = scale * projected[feature]
        worst = max(worst, np.linalg.norm(change[token] - expected) / np.linalg.norm(expected))
        # float32: the difference of two outputs carries a few ulp of the outputs
        np.testing.assert_allclose(change[token], expected, rtol=1e-4,
                                   atol=1e-4 * np.abs(expected).max() + 1e-6 * np.abs(base).max())
        others = np.delete(change, token, axis=0)  # o_proj works token by token
        assert np.abs(others).max() <= 1e-6 * np.abs(base).max()
    assert worst < 1e-4
    return worst


def test_every_hooked_architecture_has_a_projection():
    assert set(SPECS) == set(ARCHITECTURES)


def test_smollm2_projection_is_exact(smollm2, monkeypatch):
    model, tokenizer = smollm2
    ids = tokenizer("def parse(path):\n    return open(path).read()", return_tensors="pt").input_ids
    attention = load_attention_output(model, 4)
    assert not attention.post_norm and (attention.d_in, attention.d_model) == (576, 576)
    np.testing.assert_array_equal(attention.w_o, model.model.layers[4].self_attn.o_proj.weight.detach().numpy())
    rng = np.random.default_rng(0)
    w_dec = rng.standard_normal((64, 576)).astype(np.float32)  # a hook_z "SAE decoder"
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    for layer in (4, 17):
        check_exact(model, ids, layer, w_dec, features=(7, 41), tokens=(3, ids.shape[1] - 1))
    # the built-in name loads the same model (here the fixture's, not a second copy)
    monkeypatch.setattr("flowdb.lm.loader.load_model", lambda name: smollm2)
    by_name = load_attention_output("smollm2-135m", 4)
    np.testing.assert_array_equal(by_name.w_o, attention.w_o)
    assert by_name.describe()["model"] == "smollm2-135m"


def test_gpt2_projection_is_exact_through_the_transposed_conv1d():
    model = tiny_model("gpt2")
    with torch.no_grad():  # c_proj's bias only shifts attn_out: make sure it is there
        model.transformer.h[1].attn.c_proj.bias.normal_(0.0, 0.02)
    attention = load_attention_output(model, 1)
    # Conv1D stores [in, out]; W_O is kept in nn.Linear's [out, in]
    np.testing.assert_array_equal(attention.w_o, model.transformer.h[1].attn.c_proj.weight.detach().numpy().T)
    w_dec = np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)
    ids = torch.randint(0, 64, (1, 9))
    check_exact(model, ids, 1, w_dec, features=(0, 5, 11), tokens=(0, 4, 8))


def test_llama_projection_is_exact_with_d_in_unlike_d_model():
    model = tiny_model("llama")
    w_dec = np.random.default_rng(2).standard_normal((16, 32)).astype(np.float32)
    check_exact(model, torch.randint(0, 64, (1, 9)), 0, w_dec, features=(3, 9), tokens=(2, 8))


@pytest.fixture(scope="module")
def gemma2():
    model = tiny_model("gemma2")
    ids = torch.randint(0, 64, (1, 9))
    return model, ids, load_attention_output(model, 1)


def test_gemma2_folds_one_plus_the_post_norm_weight(gemma2):
    model, _, attention = gemma2
    block = model.model.layers[1]
    assert attention.post_norm and (attention.d_in, attention.d_model) == (32, 48)
    np.testing.assert_array_equal(attention.w_o, block.self_attn.o_proj.weight.detach().numpy())
    np.testing.assert_allclose(attention.gain, 1.0 + block.post_attention_layernorm.weight.detach().numpy())
    row = np.random.default_rng(3).standard_normal(32).astype(np.float32)
    with torch.no_grad():  # the transformers module applied to o_proj(row), up to its 1/RMS
        normed = block.post_attention_layernorm(block.self_attn.o_proj(torch.tensor(row))).numpy()
    assert cosine(normed, project_hook_z(row, attention)) > 1 - 1e-6


def test_gemma2_feature_shares_of_attn_out_lie_exactly_along_the_projected_rows(gemma2):
    """With hook_z at a token written as sum_i a_i d_i (an SAE's reconstruction),
    attn_out there is sum_i (a_i / rms(o)) p_i: one scalar for the token."""
    model, ids, attention = gemma2
    rng = np.random.default_rng(4)
    w_dec = rng.standard_normal((8, 32)).astype(np.float32)
    acts = np.abs(rng.standard_normal(8)).astype(np.float32)
    z_new = acts @ w_dec
    token, z_hook, out_hook = 5, "blocks.1.attn.hook_z", "blocks.1.hook_attn_out"

    def replace(z):
        z = z.clone()
        z[:, token] = torch.tensor(z_new)
        return z

    with torch.no_grad(), intervene(model, {z_hook: replace}), capture(model, [out_hook]) as acts_out:
        model(ids)
    attn_out = acts_out[out_hook][0, token].numpy()
    combined = acts @ project_hook_z(w_dec, attention)
    o = attention.w_o @ z_new
    rms = np.sqrt(np.mean(o.astype(np.float64) ** 2) + model.config.rms_norm_eps)
    np.testing.assert_allclose(attn_out, combined / rms, rtol=1e-4, atol=1e-5 * np.abs(attn_out).max())
    assert cosine(attn_out, combined) > 1 - 1e-6


def test_gemma2_intervention_agrees_in_direction_up_to_the_rms_change(gemma2):
    """Measured (d_model 48, random unit rows scaled to 1% of the token's hook_z norm,
    8 tokens x 16 rows): cosine(change of attn_out, projected row) min 0.912, median
    0.981. Against the first-order prediction g * (delta - o_hat (o_hat . delta)) /
    rms(o), which includes the change of the token's RMS, min 0.99997. Rows whose W_O
    image is orthogonal to the token's attention output o (the RMS does not move)
    agree with the projection to >= 0.99998; leaving the gain 1 + w out gives 0.84-0.94.
    The gap is first order, so it does not shrink with the scale (a sweep on other
    rows: min 0.87, median 0.975 at both 1e-3 and 1e-2): it is the row's component along o, about
    1/sqrt(d_model) for a random row (median 0.999, min 0.9915 at d_model 768)."""
    model, ids, attention = gemma2
    rng = np.random.default_rng(5)
    w_dec = rng.standard_normal((16, 32)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    projected = project_hook_z(w_dec, attention)
    z_all = hook_z(model, ids, 1)
    edits, first_order, orthogonal_rows = [], [], []
    for token in range(1, ids.shape[1]):
        z = z_all[token]
        o = (attention.w_o @ z).astype(np.float64)
        o_hat = o / np.linalg.norm(o)
        rms = np.sqrt(np.mean(o ** 2) + model.config.rms_norm_eps)
        scale = np.linalg.norm(z) * 1e-2
        for feature in range(len(w_dec)):
            edits.append((token, scale * w_dec[feature]))
            delta = attention.w_o @ edits[-1][1]
            first_order.append(attention.gain * (delta - o_hat * (o_hat @ delta)) / rms)
        # a row whose W_O image is orthogonal to o: the RMS stays, the direction is exact
        u = attention.w_o.T @ o
        row = w_dec[token] - (w_dec[token] @ u) / (u @ u) * u
        orthogonal_rows.append((token, (row / np.linalg.norm(row) * scale).astype(np.float32)))
    base, edited = attn_out_with_rows(model, ids, 1, edits + orthogonal_rows)
    changes = [edited[item, token] - base[item, token] for item, (token, _) in enumerate(edits + orthogonal_rows)]
    n = len(edits)
    to_projection = [cosine(changes[i], projected[i % len(w_dec)]) for i in range(n)]
    to_first_order = [cosine(changes[i], first_order[i]) for i in range(n)]
    orthogonal = [cosine(changes[n + i], project_hook_z(row, attention))
                  for i, (_, row) in enumerate(orthogonal_rows)]
    unfolded = [cosine(changes[n + i], attention.w_o @ row)  # the gain 1 + w left out
                for i, (_, row) in enumerate(orthogonal_rows)]
    assert min(to_first_order) >= 0.9999
    assert min(orthogonal) >= 0.9999
    assert min(to_projection) >= 0.85 and np.median(to_projection) >= 0.95
    assert max(unfolded) < 0.99  # without 1 + w the direction is clearly off


def test_load_from_a_local_directory_reads_the_same_weights(tmp_path):
    for kind in ("llama", "gemma2", "gpt2"):
        model = tiny_model(kind)
        for shards in ("50GB", "20KB"):
            directory = tmp_path / f"{kind}-{shards}"
            model.save_pretrained(directory, max_shard_size=shards)
            assert (directory / "model.safetensors.index.json").exists() == (shards == "20KB")
            for layer in range(N_LAYERS):
                loaded = load_attention_output(str(directory), layer)
                in_memory = load_attention_output(model, layer)
                np.testing.assert_array_equal(loaded.w_o, in_memory.w_o)
                assert loaded.post_norm == in_memory.post_norm == (kind == "gemma2")
                if loaded.post_norm:
                    np.testing.assert_array_equal(loaded.gain, in_memory.gain)
                assert loaded.describe()["sha256"] == in_memory.describe()["sha256"]
                assert loaded.describe()["model"] == str(directory)
    with pytest.raises(FlowdbError, match="there is no layer 2"):
        load_attention_output(str(tmp_path / "gpt2-50GB"), 2)


class FakeHub:
    """HfFileSystem's exists/open over a local directory, counting the bytes read."""

    def __init__(self, repo_id, directory):
        self.repo_id, self.directory, self.bytes_read = repo_id, directory, 0

    def _path(self, path):
        repo, name = path.rsplit("/", 1)
        assert repo == self.repo_id
        return self.directory / name

    def exists(self, path):
        return self._path(path).is_file()

    def open(self, path, mode):
        hub, handle = self, open(self._path(path), mode)

        class Counting:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

            def seek(self, offset):
                return handle.seek(offset)

            def read(self, size=-1):
                data = handle.read(size)
                hub.bytes_read += len(data)
                return data

        return Counting()


def test_hub_source_reads_only_that_layers_tensors(tmp_path, monkeypatch):
    model = tiny_model("gemma2").to(torch.bfloat16)  # bf16 on disk, as many checkpoints are
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    hub = FakeHub("google/tiny-gemma-2", tmp_path)
    monkeypatch.setattr("flowdb.packs.projection._hub_filesystem", lambda: hub)
    loaded = load_attention_output("google/tiny-gemma-2", 1)
    np.testing.assert_array_equal(loaded.w_o, model.model.layers[1].self_attn.o_proj.weight.detach().float().numpy())
    np.testing.assert_array_equal(
        loaded.gain, 1.0 + model.model.layers[1].post_attention_layernorm.weight.detach().float().numpy())
    # config, index, two headers and two tensors: far less than the checkpoint
    total = sum(path.stat().st_size for path in tmp_path.glob("*.safetensors"))
    assert hub.bytes_read < total / 3
    # the range reader agrees with safetensors' own for every tensor of every dtype
    from safetensors import safe_open

    for shard in tmp_path.glob("*.safetensors"):
        with open(shard, "rb") as handle, safe_open(str(shard), framework="pt") as reference:
            header, base = read_safetensors_header(handle)
            for key in reference.keys():
                torch.testing.assert_close(read_safetensors_tensor(handle, header[key], base),
                                           reference.get_tensor(key), rtol=0, atol=0)


def test_describe_records_the_projection(gemma2):
    _, _, attention = gemma2
    record = attention.describe()
    assert {key: record[key] for key in ("projection", "layer", "post_norm", "d_in", "d_model")} == \
        {"projection": "W_O", "layer": 1, "post_norm": True, "d_in": 32, "d_model": 48}
    assert record["model_type"] == "gemma2" and len(record["sha256"]) == 64
    json.dumps(record)  # storable as it is


def info(hook_name, d_in, layer=1, module="att"):
    return SaeInfo(SourceRef(module, layer, "path", "/x"), d_in, 16, hook_name, None)


def test_space_check_accepts_only_what_the_projection_covers(gemma2):
    _, _, attention = gemma2
    hook_z = info("blocks.1.attn.hook_z", 32)
    with pytest.raises(PackError, match="concatenated attention-head outputs"):
        check_same_space(hook_z, residual_d_in=48)  # unchanged without the keyword
    check_same_space(hook_z, residual_d_in=48, projected_from=32)
    attention.check_space(hook_z, residual_d_in=48)
    attention.check_space(info(None, 32), residual_d_in=48)  # an npz: hook unknown
    with pytest.raises(PackError, match="d_in 24 differs from the input width 32"):
        attention.check_space(info("blocks.1.attn.hook_z", 24), residual_d_in=48)
    with pytest.raises(PackError, match="only attn.hook_z SAEs"):
        attention.check_space(info("blocks.1.hook_attn_out", 32), residual_d_in=48)
    with pytest.raises(PackError, match="writes width 48, but the residual SAEs read 64"):
        attention.check_space(hook_z, residual_d_in=64)
    with pytest.raises(PackError, match="projected through W_O of layer 1"):
        attention.check_space(info("blocks.0.attn.hook_z", 32, layer=0), residual_d_in=48)
    with pytest.raises(PackError, match="d_in 32 differs from the residual SAEs' d_in 48"):
        check_same_space(info(None, 32), residual_d_in=48)  # other mismatches: still refused


def test_refusals():
    with pytest.raises(PackError, match="cannot go through W_O"):
        project_hook_z(np.ones((3, 31), np.float32), load_attention_output(tiny_model("gpt2"), 0))

    class Bert:
        class config:
            model_type = "bert"

    with pytest.raises(FlowdbError, match="no attention output projection known for model type 'bert'"):
        load_attention_output(Bert(), 0)
    with pytest.raises(FlowdbError, match="the model has 2 blocks"):
        load_attention_output(tiny_model("llama"), 5)
    with pytest.raises(FlowdbError, match="layer must be a non-negative integer"):
        load_attention_output(tiny_model("llama"), -1)
    assert isinstance(load_attention_output(tiny_model("llama"), 0), AttentionOutput)


def test_hook_z_attention_saes_are_matched_through_w_o(db, tmp_path):
    """A pack whose attention SAEs read hook_z (d_in 32) beside residual SAEs (d 48):
    ingest projects them through the tiny Gemma 2's W_O and post-norm gain, and the
    stored attention edges are the brute-force matches to those projected rows."""
    from flowdb.errors import PackError
    from flowdb.packs.manifest import load_manifest
    from flowdb.packs.synth import write_sae
    from flowdb.store.ingest import ingest
    from flowdb.store.templates import run_template

    model = tiny_model("gemma2")
    model.save_pretrained(tmp_path / "gemma2")
    rng = np.random.default_rng(3)
    decoders = {}
    for layer in range(N_LAYERS):
        decoders[("res", layer)] = rng.standard_normal((64, 48)).astype(np.float32)
        decoders[("att", layer)] = rng.standard_normal((40, 32)).astype(np.float32)
        write_sae(tmp_path / "saes" / "res" / f"layer_{layer}", decoders[("res", layer)],
                  f"blocks.{layer}.hook_resid_post", "tiny-gemma2")
        write_sae(tmp_path / "saes" / "att" / f"layer_{layer}", decoders[("att", layer)],
                  f"blocks.{layer}.attn.hook_z", "tiny-gemma2")
    text = ('name = "zpack"\nmodel = "tiny-gemma2"\nlayers = [0, 1]\n'
            '[modules.res]\npath = "saes/res/layer_{layer}"\n'
            '[modules.att]\npath = "saes/att/layer_{layer}"\n')
    manifest = tmp_path / "z.toml"
    manifest.write_text(text)
    with pytest.raises(PackError, match="hook_z"):  # without a projection: refused, as before
        ingest(load_manifest(manifest), db)
    manifest.write_text(text + 'project = "W_O"\nproject_model = "gemma2"\n')
    ingest(load_manifest(manifest), db)
    edges = run_template(db, "edges", {"pack": "zpack"})
    for layer in range(N_LAYERS):
        block = model.model.layers[layer]
        w_o = block.self_attn.o_proj.weight.detach().numpy().astype(np.float64)
        gain = 1.0 + block.post_attention_layernorm.weight.detach().numpy().astype(np.float64)
        projected = (decoders[("att", layer)].astype(np.float64) @ w_o.T) * gain
        projected /= np.linalg.norm(projected, axis=1, keepdims=True)
        queries = decoders[("res", layer)].astype(np.float64)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        cos = queries @ projected.T
        stored = edges[(edges["kind"] == "attention") & (edges["dst_layer"] == layer)].sort_values("dst_index")
        np.testing.assert_array_equal(stored["src_index"].to_numpy(), cos.argmax(axis=1))
        np.testing.assert_allclose(stored["cosine"].to_numpy(), cos.max(axis=1), atol=1e-5)
    sae = db.read("MATCH (s:SAE {key: 'zpack/1/att'}) RETURN s.projection AS p, s.projection_post_norm AS post, "
                  "s.projected_from_d_in AS d_z, s.d_in AS d_in, s.projection_model AS model")[0]
    assert sae == {"p": "W_O", "post": True, "d_z": 32, "d_in": 48, "model": str(tmp_path / "gemma2")}


class _Recorder(BaseHTTPRequestHandler):
    """Another origin: records who sent which Authorization."""

    seen: list = []

    def do_GET(self):  # noqa: N802
        _Recorder.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_a_hub_redirect_to_another_origin_carries_no_token(tmp_path):
    """The Hub answers downloads with redirects to other hosts (its CDN), so they must be
    followed; huggingface_hub drops the token on a redirect off its origin. This holds
    it to that, for the Hub reads flowdb makes itself (the W_O of a Hub model)."""
    _Recorder.seen = []
    elsewhere = serve(_Recorder)
    hub_seen = []

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hub_seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{elsewhere.server_address[1]}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    hub = serve(Hub)
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}", "HF_TOKEN": "hf_secret",
           "HF_HOME": str(tmp_path / "hf")}
    code = "from flowdb.packs.projection import load_attention_output; load_attention_output('org/model', 0)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    for server in (hub, elsewhere):
        server.shutdown()
        server.server_close()
    assert done.returncode != 0  # nothing there is a model
    assert ("/api/models/org/model", "Bearer hf_secret") in hub_seen  # the Hub's own origin had it
    assert _Recorder.seen, "the redirect was not followed, so this test shows nothing"
    assert [token for _, token in _Recorder.seen if token] == []
