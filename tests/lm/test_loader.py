"""The built-in model's one-time conversion from GGUF (flowdb.lm.loader)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from flowdb.errors import FlowdbError
from flowdb.lm import loader


def test_conversion_holds_the_gguf_weights_and_vocabulary(smollm2):
    """The converted model's weights are the GGUF tensors de-quantised by the gguf package
    itself, and its tokenizer has the GGUF file's vocabulary."""
    gguf = pytest.importorskip("gguf")
    model, tokenizer = smollm2
    reader = gguf.GGUFReader(str(loader.builtin_gguf("smollm2-135m")))
    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight": model.model.embed_tokens.weight,
                "blk.7.ffn_down.weight": model.model.layers[7].mlp.down_proj.weight,
                "blk.29.ffn_up.weight": model.model.layers[29].mlp.up_proj.weight}
    for name, weight in expected.items():
        t = tensors[name]
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(weight.detach().numpy(), values.reshape(weight.shape))
    field = reader.fields["tokenizer.ggml.tokens"]
    vocabulary = [bytes(field.parts[i]).decode() for i in field.data]
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    assert [token for token, _ in by_id] == vocabulary


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """A fresh FLOWDB_HOME and a stand-in for the half-minute GGUF conversion that writes a
    config and counts its calls; load_model itself is not called."""
    monkeypatch.setenv("FLOWDB_HOME", str(tmp_path / "home"))
    calls = []

    def convert(gguf, into):
        calls.append(into)
        into.mkdir()
        (into / "config.json").write_text("{}")

    monkeypatch.setattr(loader, "convert_gguf", convert)
    return calls


def test_converted_once_then_reused(fake_conversion):
    first = loader._converted_builtin("smollm2-135m")
    assert loader._converted_builtin("smollm2-135m") == first
    assert len(fake_conversion) == 1 and not fake_conversion[0].exists()  # renamed into place
    assert first.name.startswith("smollm2-135m-") and [p.name for p in first.parent.iterdir()] == [first.name]


def test_another_gguf_replaces_the_old_conversion(fake_conversion, monkeypatch):
    old = loader._converted_builtin("smollm2-135m")
    monkeypatch.setattr(loader, "file_digest", lambda path: "f" * 64)
    new = loader._converted_builtin("smollm2-135m")
    assert new != old and new.exists() and not old.exists()


def test_two_conversions_at_once_end_with_one_whole_copy(fake_conversion):
    barrier, results = threading.Barrier(2), []
    convert = loader.convert_gguf

    def slow(gguf, into):
        convert(gguf, into)
        barrier.wait(timeout=30)  # both have written their own folder before either renames

    loader.convert_gguf = slow
    threads = [threading.Thread(target=lambda: results.append(loader._converted_builtin("smollm2-135m")))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert [p.name for p in results[0].parent.iterdir()] == [results[0].name]  # no partial folder left


def test_a_failed_conversion_is_one_line_and_leaves_nothing(fake_conversion, monkeypatch):
    def full(gguf, into):
        into.mkdir()
        (into / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loader, "convert_gguf", full)
    with pytest.raises(FlowdbError, match=r"cannot save the converted model smollm2-135m .*No space left") as error:
        loader._converted_builtin("smollm2-135m")
    assert "\n" not in str(error.value)
    assert list(loader.converted_dir("smollm2-135m").parent.iterdir()) == []
