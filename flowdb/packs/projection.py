"""Attention SAEs on hook_z, projected into the residual space through W_O.

An SAE on `blocks.L.attn.hook_z` (Gemma Scope's attention SAEs) reads the
concatenated head outputs z (d_in = n_heads * head_dim, heads major: index
h * head_dim + i, the order of sae-lens's hook_z flattening, of TransformerLens's
W_O and of Hugging Face's reshape before o_proj). Its decoder rows cannot be
cosine-matched to residual features (d_model) as they are. What the layer adds to
the residual stream from z is

    o   = z @ W_O^T (+ b_O)                       o_proj / GPT-2's c_proj
    A_L = o                                       Llama family, GPT-2
    A_L = g * o / rms(o),  g = 1 + w,             Gemma 2 (post_attention_layernorm:
          rms(o) = sqrt(mean(o^2) + eps)          Gemma's RMSNorm scales by 1 + weight)

`project_hook_z` maps each decoder row d to p = (d @ W_O^T) * g (g = 1 without a
post-norm). What that assumes:

- o_proj is linear: a feature adding a * d to z adds exactly a * (d @ W_O^T) to o.
  The bias b_O (GPT-2) does not depend on the feature; it only shifts o.
- Gemma 2's division by rms(o) is one positive scalar per token, taken over the
  whole attention output: it changes lengths, not directions. If z = sum_i a_i d_i
  (+ b_dec + SAE error), then A_L = sum_i (a_i / rms(o)) p_i (+ the same terms of
  b_dec and the error), exactly: every feature's share of A_L lies along its p_i.
  Cosine matching compares directions, so folding the elementwise gain g into the
  rows is all the norm needs, and the projected rows are in A_L's space (where an
  hook_attn_out SAE would read).
- The exception: the scalar 1/rms(o) is shared by all features on the token. Adding
  a feature (an intervention) also changes rms(o), which rescales everything else
  on that token; to first order the change of A_L is
  g * (delta - o_hat (o_hat . delta)) / rms(o), delta = a * (d @ W_O^T),
  o_hat = o / |o|. Its direction differs from p by the component of delta along the
  token's own attention output, so a measured intervention agrees with p in
  direction only up to that (tests/test_projection.py measures it). Without a
  post-norm the intervention is exact.
- The projected rows are not renormalised (matching normalises); their lengths
  carry W_O's and g's scales.

`load_attention_output` reads W_O (and g) for one layer from a model object, a
local directory, or a Hub id, reading only that layer's tensors where the
checkpoint is in safetensors.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowdb.errors import FlowdbError, PackError
from flowdb.files import read_small_text, regular_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MODEL_JSON_BYTES = 16 << 20  # config.json and a shard index; the largest models' index is ~100 kB


@dataclass(frozen=True)
class _Spec:
    o_proj: str  # the checkpoint key of W_O, without any prefix before "layers."/"h."
    post_norm: str | None  # the key of the post-attention norm folded into A_L (Gemma 2)
    transposed: bool  # stored [in, out] (GPT-2's Conv1D) rather than nn.Linear's [out, in]


_LLAMA = _Spec("layers.{layer}.self_attn.o_proj.weight", None, False)
# Llama's post_attention_layernorm is the norm BEFORE the MLP: it is not on A_L, so
# only Gemma 2 names one here.
SPECS = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma2": _Spec("layers.{layer}.self_attn.o_proj.weight",
                    "layers.{layer}.post_attention_layernorm.weight", False),
    "gpt2": _Spec("h.{layer}.attn.c_proj.weight", None, True),
}


@dataclass(frozen=True, eq=False)
class AttentionOutput:
    """What one layer does to z before adding it to the residual stream."""

    w_o: np.ndarray  # [d_model, n_heads * head_dim] float32, nn.Linear's layout
    gain: np.ndarray | None  # [d_model] float32, 1 + post-norm weight (Gemma 2); None without
    model: str  # the model source as given (hub id, directory or name)
    layer: int
    model_type: str

    @property
    def d_in(self) -> int:
        """The width of hook_z: n_heads * head_dim."""
        return int(self.w_o.shape[1])

    @property
    def d_model(self) -> int:
        return int(self.w_o.shape[0])

    @property
    def post_norm(self) -> bool:
        return self.gain is not None

    def digest(self) -> str:
        """SHA-256 of the weights the projection uses (W_O, then the gain if any)."""
        digest = hashlib.sha256(np.ascontiguousarray(self.w_o).tobytes())
        if self.gain is not None:
            digest.update(b"gain\0" + np.ascontiguousarray(self.gain).tobytes())
        return digest.hexdigest()

    def describe(self) -> dict:
        """The projection's record, for a build's provenance."""
        return {"projection": "W_O", "model": self.model, "layer": self.layer,
                "model_type": self.model_type, "post_norm": self.post_norm,
                "d_in": self.d_in, "d_model": self.d_model, "sha256": self.digest()}

    def check_space(self, info, residual_d_in: int) -> None:
        """Refuse an SAE (flowdb.packs.sources.SaeInfo) this projection does not put in the
        residual space: not hook_z, another d_in, another layer, or a W_O that writes
        another width than the residual SAEs read."""
        from flowdb.lm.hooks import HOOK_NAME
        from flowdb.packs.sources import check_same_space

        check_same_space(info, residual_d_in, projected_from=self.d_in)
        if self.d_model != residual_d_in:
            raise PackError(f"{info.where()}: the attention output projection of {self.model} "
                            f"layer {self.layer} writes width {self.d_model}, but the residual "
                            f"SAEs read {residual_d_in}")
        match = HOOK_NAME.match(info.hook_name or "")
        layers = {info.ref.layer} | ({int(match.group(1))} if match else set())
        if layers != {self.layer}:
            raise PackError(f"{info.where()}: reads {info.hook_name or 'layer ' + str(info.ref.layer)} "
                            f"but is projected through W_O of layer {self.layer}")


def project_hook_z(w_dec, attention_output: AttentionOutput) -> np.ndarray:
    """Decoder rows on hook_z ([d_sae, n_heads * head_dim], or one row) mapped into
    the residual space: row @ W_O^T (o_proj without its bias), times the post-norm's
    elementwise gain 1 + w for Gemma 2. float32, [d_sae, d_model] (or [d_model]).

    Exact in direction for o_proj. For Gemma 2 the post-norm also divides A_L by the
    RMS of the token's whole attention output; that scalar is shared by every feature
    on the token, so each feature's share of A_L is exactly along the returned row
    (cosine matching needs only directions), but an intervention that adds a feature
    also changes that RMS: see the module docstring for what that leaves out."""
    w = np.asarray(w_dec, dtype=np.float32)
    if w.ndim not in (1, 2) or w.shape[-1] != attention_output.d_in:
        raise PackError(f"decoder rows of shape {tuple(w.shape)} cannot go through W_O of "
                        f"{attention_output.model} layer {attention_output.layer}, which reads "
                        f"{attention_output.d_in} (n_heads * head_dim) values")
    projected = w @ attention_output.w_o.T
    if attention_output.gain is not None:
        projected = projected * attention_output.gain
    return np.asarray(projected, dtype=np.float32)


def load_attention_output(model_source, layer: int, *, revision: str | None = None,
                          name: str | None = None) -> AttentionOutput:
    """W_O (and Gemma 2's post-attention norm gain) of one layer.

    model_source: a loaded transformers model, a local directory (safetensors:
    only this layer's tensors are read, through the index where sharded; other
    formats load the model), flowdb's built-in model name (`smollm2-135m`), or a
    Hugging Face Hub id (only config.json, the index and this layer's tensor bytes
    are fetched, by range reads; needs the network and, for gated models such as
    Gemma, an accepted licence and a token). name: how describe() names the model
    (default: the source as given, or the loaded model's name_or_path)."""
    if not isinstance(layer, int) or layer < 0:
        raise FlowdbError(f"layer must be a non-negative integer, not {layer!r}")
    if not isinstance(model_source, (str, Path)):
        label = name or getattr(model_source, "name_or_path", None) or type(model_source).__name__
        return _from_model(model_source, layer, str(label))
    source = str(model_source)
    label = name or source
    from flowdb.lm.loader import BUILTIN_GGUF

    if Path(source).is_dir():
        files = _LocalFiles(Path(source))
    elif source in BUILTIN_GGUF:
        from flowdb.lm.loader import load_model

        return _from_model(load_model(source)[0], layer, label)
    elif Path(source).exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FlowdbError(f"model {source!r}: not a directory, a built-in model or a Hub id")
    else:
        files = _HubFiles(source, revision)
    try:
        found = _from_files(files, layer, label)
    except FlowdbError:
        raise
    except Exception as exc:  # hub, file-system and format errors of many types
        raise FlowdbError(f"cannot read the attention output projection of {source!r} layer "
                          f"{layer} ({type(exc).__name__}: {exc})") from None
    if found is not None:
        return found
    return _from_model(_load_full_model(source, revision), layer, label)  # no safetensors


def _from_model(model, layer: int, label: str) -> AttentionOutput:
    from flowdb.lm.hooks import resolve

    model_type = getattr(model.config, "model_type", None)
    spec = _spec(model_type, label)
    o_proj, _ = resolve(model, f"blocks.{layer}.attn.hook_z")  # checks the layer exists
    w_o = _numpy(o_proj.weight)
    if spec.transposed:
        w_o = w_o.T
    gain = None
    if spec.post_norm:
        norm, _ = resolve(model, f"blocks.{layer}.hook_attn_out")
        gain = 1.0 + _numpy(norm.weight)
    return _checked(w_o, gain, model.config, label, layer, model_type)


def _from_files(files, layer: int, label: str) -> AttentionOutput | None:
    if not files.exists(CONFIG_FILE):
        raise FlowdbError(f"model {label!r}: no {CONFIG_FILE} in {files.where}")
    config = _config(json.loads(files.text(CONFIG_FILE)), label)
    spec = _spec(config.model_type, label)
    n_layers = config.num_hidden_layers
    if layer >= n_layers:
        raise FlowdbError(f"model {label!r} has {n_layers} layers; there is no layer {layer}")
    if files.exists(INDEX_FILE):
        weight_map = json.loads(files.text(INDEX_FILE))["weight_map"]
    elif files.exists(SINGLE_FILE):
        weight_map = dict.fromkeys(files.keys(SINGLE_FILE), SINGLE_FILE)
    else:
        return None
    wanted = [spec.o_proj] + ([spec.post_norm] if spec.post_norm else [])
    keys = [_find_key(weight_map, pattern.format(layer=layer), label) for pattern in wanted]
    tensors = {}
    for file in sorted({weight_map[key] for key in keys}):
        tensors.update(files.tensors(file, [key for key in keys if weight_map[key] == file]))
    w_o = _numpy(tensors[keys[0]])
    if spec.transposed:
        w_o = w_o.T
    gain = 1.0 + _numpy(tensors[keys[1]]) if spec.post_norm else None
    return _checked(w_o, gain, config, label, layer, config.model_type)


def _checked(w_o, gain, config, label, layer, model_type) -> AttentionOutput:
    d_model = config.hidden_size
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d_model // n_heads
    if w_o.shape != (d_model, n_heads * head_dim):
        raise FlowdbError(f"model {label!r} layer {layer}: W_O has shape {tuple(w_o.shape)}, expected "
                          f"[d_model, n_heads * head_dim] = [{d_model}, {n_heads * head_dim}]")
    if gain is not None and gain.shape != (d_model,):
        raise FlowdbError(f"model {label!r} layer {layer}: the post-attention norm has shape "
                          f"{tuple(gain.shape)}, expected [{d_model}]")
    return AttentionOutput(np.ascontiguousarray(w_o, dtype=np.float32),
                           None if gain is None else np.asarray(gain, dtype=np.float32),
                           label, layer, model_type)


def _spec(model_type, label) -> _Spec:
    if model_type not in SPECS:
        raise FlowdbError(f"model {label!r}: no attention output projection known for model type "
                          f"{model_type!r}; known: {', '.join(sorted(SPECS))}")
    return SPECS[model_type]


def _config(values: dict, label: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = values.get("model_type")
    _spec(model_type, label)
    return CONFIG_MAPPING[model_type].from_dict(values)


def _find_key(keys, suffix: str, label: str) -> str:
    """The checkpoint key ending in suffix at a dotted boundary (checkpoints prefix
    `model.`, `transformer.` or nothing)."""
    pattern = re.compile(r"(?:^|\.)" + re.escape(suffix) + "$")
    found = [key for key in keys if pattern.search(key)]
    if len(found) != 1:
        what = "no tensor" if not found else f"{len(found)} tensors ({', '.join(sorted(found))})"
        raise FlowdbError(f"model {label!r}: {what} named like {suffix!r} in the checkpoint")
    return found[0]


def _numpy(tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


class _LocalFiles:
    def __init__(self, directory: Path):
        self.directory = directory
        self.where = str(directory)

    def exists(self, name: str) -> bool:
        return (self.directory / name).exists()

    def file(self, name: str) -> str:
        return str(regular_file(self.directory / name, "model file"))

    def text(self, name: str) -> str:
        return read_small_text(self.directory / name, "model file", max_bytes=MODEL_JSON_BYTES)

    def keys(self, name: str) -> list[str]:
        from safetensors import safe_open

        with safe_open(self.file(name), framework="pt") as handle:
            return list(handle.keys())

    def tensors(self, name: str, keys: list[str]) -> dict:
        from safetensors import safe_open

        with safe_open(self.file(name), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in keys}


def _hub_filesystem():
    from huggingface_hub import HfFileSystem

    return HfFileSystem()


class _HubFiles:
    """A Hub repository's files, read by ranges: a shard's header, then one tensor's bytes."""

    def __init__(self, repo_id: str, revision: str | None):
        self.fs = _hub_filesystem()
        self.prefix = f"{repo_id}@{revision}" if revision else repo_id
        self.where = f"the Hub repository {self.prefix}"

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(f"{self.prefix}/{name}"))

    def text(self, name: str) -> str:
        with self.fs.open(f"{self.prefix}/{name}", "rb") as handle:
            return handle.read().decode("utf-8")

    def keys(self, name: str) -> list[str]:
        with self.fs.open(f"{self.prefix}/{name}", "rb") as handle:
            return [key for key in read_safetensors_header(handle)[0] if key != "__metadata__"]

    def tensors(self, name: str, keys: list[str]) -> dict:
        with self.fs.open(f"{self.prefix}/{name}", "rb") as handle:
            header, base = read_safetensors_header(handle)
            return {key: read_safetensors_tensor(handle, header[key], base) for key in keys}


def read_safetensors_header(handle) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its
    data starts, from a seekable binary file: 8 bytes little-endian length, JSON."""
    handle.seek(0)
    (length,) = struct.unpack("<Q", handle.read(8))
    if length > 100_000_000:
        raise FlowdbError(f"not a safetensors file (header length {length})")
    return json.loads(handle.read(length)), 8 + length


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def read_safetensors_tensor(handle, entry: dict, base: int):
    """One tensor's bytes (and only those) as a torch tensor."""
    import torch

    if entry["dtype"] not in _SAFETENSORS_DTYPES:
        raise FlowdbError(f"unsupported safetensors dtype {entry['dtype']}")
    start, end = entry["data_offsets"]
    handle.seek(base + start)
    data = handle.read(end - start)
    if len(data) != end - start:
        raise FlowdbError("truncated safetensors file")
    dtype = getattr(torch, _SAFETENSORS_DTYPES[entry["dtype"]])
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(entry["shape"])


def _load_full_model(source: str, revision: str | None):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=torch.float32)
    except OSError as exc:
        raise FlowdbError(f"cannot load model {source!r}: {exc}") from None
