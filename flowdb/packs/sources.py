"""SAE sources: decoder matrices from local sae-lens directories, Gemma Scope
params.npz files, sae-lens releases, or circuit-tracer transcoder sets (the mlp slot;
their layout is flowdb.packs.transcoders').

`inspect` reads only headers (cheap, for checking a whole pack up front);
`load_decoder` gives W_dec as float32 rows [d_sae, d_in] and rejects NaN/Inf and
all-zero rows; `load_encoder` gives W_enc's columns the same way (for builds that
match with [match] score = "encoder"). Local sae-lens directories are read with safetensors directly, so
a pack on disk is checked without importing torch, and lazily: a slice of rows at a
time (`SafetensorsRows`), so a wide decoder is never whole in memory; a transcoder's
layer file is read the same way (its W_dec is [d_transcoder, d_model], as an SAE's). Gemma Scope
params.npz files (whose members may be compressed) and releases (through sae-lens)
are read whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowdb.errors import FlowdbError, PackError
from flowdb.files import read_config_text, regular_file
from flowdb.packs.manifest import SourceRef
from flowdb.packs.transcoders import TranscoderSet, read_set
from flowdb.settings import flowdb_home, home_dir

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


@dataclass(frozen=True)
class SaeInfo:
    ref: SourceRef
    d_in: int | None  # None until loaded, for releases
    d_sae: int | None
    hook_name: str | None
    neuronpedia_id: str | None  # "modelId/source" where known
    projection: dict | None = None  # set once a hook_z decoder is projected through W_O
    scan: str | None = None  # a transcoder set's scan (what attribution graphs name it by)

    def where(self) -> str:
        return where(self.ref)


def where(ref: SourceRef) -> str:
    return f"layer {ref.layer} module {ref.module} ({ref.describe()})"


def inspect(ref: SourceRef) -> SaeInfo:
    """Check that the source exists and read its shape, without reading weights."""
    if ref.kind == "path":
        return _inspect_saelens_dir(ref)
    if ref.kind == "npz":
        return _inspect_npz(ref)
    if ref.kind == "transcoders":
        return _inspect_transcoder(ref)[0]
    return _inspect_release(ref)


def load_decoder(ref: SourceRef) -> tuple[SaeInfo, np.ndarray | SafetensorsRows]:
    """W_dec as float32 rows [d_sae, d_in], checked for NaN/Inf and all-zero rows: an
    array, or for a local sae-lens directory rows read on demand (sliced like an array,
    which is how flowdb.flow.matching reads it; np.asarray reads it whole)."""
    if ref.kind == "path":
        info = _inspect_saelens_dir(ref)
        w_dec = SafetensorsRows(Path(ref.location) / WEIGHTS_FILE, "W_dec", ref)
    elif ref.kind == "transcoders":
        info, file = _inspect_transcoder(ref)
        w_dec = SafetensorsRows(file, "W_dec", ref)
    elif ref.kind == "npz":
        info = _inspect_npz(ref)
        try:
            with np.load(local_file(Path(ref.location), ref)) as data:
                w_dec = np.asarray(data["W_dec"], dtype=np.float32)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            raise PackError(f"{where(ref)}: cannot read W_dec ({exc})") from None
    else:
        info, w_dec = _load_release(ref)
    if w_dec.ndim != 2 or (info.d_sae, info.d_in) != w_dec.shape:
        raise PackError(f"{where(ref)}: W_dec has shape {tuple(w_dec.shape)}, "
                        f"expected [d_sae, d_in] = [{info.d_sae}, {info.d_in}]")
    check_decoder(w_dec, ref)
    return info, w_dec


def load_encoder(ref: SourceRef) -> tuple[SaeInfo, np.ndarray]:
    """W_enc's columns (what each feature reads) as float32 rows [d_sae, d_in], checked
    like a decoder. Read whole: sae-lens and Gemma Scope store W_enc as [d_in, d_sae]."""
    if ref.kind == "path":
        info = _inspect_saelens_dir(ref)
        weights = Path(ref.location) / WEIGHTS_FILE
        _safetensor_header(weights, "W_enc", ref)  # a missing W_enc is named, not a safetensors error
        w_enc = np.asarray(SafetensorsRows(weights, "W_enc", ref))
    elif ref.kind == "transcoders":  # circuit-tracer stores W_enc as rows already: [d_transcoder, d_model]
        info, file = _inspect_transcoder(ref)
        rows = np.asarray(SafetensorsRows(file, "W_enc", ref))
        check_decoder(rows, ref, "W_enc")
        return info, rows
    elif ref.kind == "npz":
        info = _inspect_npz(ref)
        try:
            with np.load(local_file(Path(ref.location), ref)) as data:
                w_enc = np.asarray(data["W_enc"], dtype=np.float32)
        except KeyError:
            raise PackError(f"{where(ref)}: params.npz has no W_enc") from None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise PackError(f"{where(ref)}: cannot read W_enc ({exc})") from None
    else:
        info, w_enc = _load_release(ref, "W_enc")
    if w_enc.ndim != 2 or (info.d_in, info.d_sae) != w_enc.shape:
        raise PackError(f"{where(ref)}: W_enc has shape {tuple(w_enc.shape)}, "
                        f"expected [d_in, d_sae] = [{info.d_in}, {info.d_sae}]")
    rows = np.ascontiguousarray(w_enc.T)
    check_decoder(rows, ref, "W_enc", "column")
    return info, rows


CHECK_BYTES = 8 << 20  # a decoder is checked in blocks of rows this large (float32)


def check_decoder(w_dec: np.ndarray | SafetensorsRows, ref: SourceRef, name: str = "W_dec",
                  unit: str = "row") -> None:
    """Refuse NaN/Inf and all-zero rows, naming the first; reads a block of rows at a time.
    name and unit say what the rows are in the message (an encoder's rows are its columns)."""
    n_rows, d = w_dec.shape
    block_rows = max(1, CHECK_BYTES // (4 * max(d, 1)))
    nonfinite, zero = [], []  # row numbers of each defect
    for start in range(0, n_rows, block_rows):
        block = np.asarray(w_dec[start:start + block_rows])
        nonfinite.extend(start + np.flatnonzero(~np.isfinite(block).all(axis=1)))
        zero.extend(start + np.flatnonzero(~np.any(block != 0, axis=1)))
    if nonfinite:
        raise PackError(f"{where(ref)}: {name} has NaN/Inf in {len(nonfinite)} {unit}(s), "
                        f"first at feature {int(nonfinite[0])}")
    if zero:
        raise PackError(f"{where(ref)}: {name} has {len(zero)} all-zero {unit}(s), "
                        f"first at feature {int(zero[0])}; a zero direction has no cosine")


def content_digest(ref: SourceRef) -> str:
    """A SHA-256 of what decides an SAE's decoder: the files of a local source, or the
    release and sae_id of a hub source (whose content sae-lens pins by release)."""
    if ref.kind == "release":
        return "release:" + hashlib.sha256(f"{ref.location}\0{ref.sae_id}".encode()).hexdigest()
    path = Path(ref.location)
    if ref.kind == "transcoders":
        found = read_set(path, where(ref))
        files = [found.config, found.layer_file(ref.layer, where(ref))]
    else:
        files = [path / CFG_FILE, path / WEIGHTS_FILE] if ref.kind == "path" else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + _file_digest(file, ref).encode())
    return digest.hexdigest()


def _file_digest(path: Path, ref: SourceRef) -> str:
    """SHA-256 of a file's bytes, remembered per (device, inode, size, mtime, ctime):
    any write changes ctime, which no user can set back, so a hit is the same content."""
    try:
        real = path.resolve(strict=True)
        stat = local_file(real, ref).stat()
    except (OSError, RuntimeError) as exc:  # missing, unreadable, or a symlink loop
        raise PackError(f"{where(ref)}: cannot read {path} ({type(exc).__name__})") from None
    stamp = f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
    cache = _digest_cache()
    if cache.get(str(real), {}).get("stamp") == stamp:
        return cache[str(real)]["sha256"]
    digest = hashlib.sha256()
    try:
        with open(real, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    except OSError as exc:
        raise PackError(f"{where(ref)}: cannot read {path} ({exc.strerror})") from None
    cache[str(real)] = {"stamp": stamp, "sha256": digest.hexdigest()}
    _save_digest_cache(cache)
    return digest.hexdigest()


def _digest_cache_path() -> Path:
    return flowdb_home() / "cache" / "digests.json"


def _digest_cache() -> dict:
    try:
        return json.loads(_digest_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_digest_cache(cache: dict) -> None:
    path = _digest_cache_path()
    try:
        home_dir("cache")
        # A private temporary file per process, then an atomic rename: concurrent
        # commands never read half a cache.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".digests-", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(cache, handle)
        os.replace(tmp, path)
    except (OSError, FlowdbError):
        pass  # the cache only saves time


def local_file(path: Path, ref: SourceRef) -> Path:
    """An SAE file that exists and is a regular file, else PackError saying which."""
    try:
        return regular_file(path, "SAE", error=PackError, where=f"{where(ref)}: ")
    except FileNotFoundError:
        raise PackError(f"{where(ref)}: missing {path.name}") from None
    except OSError as exc:
        raise PackError(f"{where(ref)}: cannot read {path} ({exc.strerror})") from None


def _inspect_saelens_dir(ref: SourceRef) -> SaeInfo:
    directory = Path(ref.location)
    text = read_config_text(directory, CFG_FILE, error=PackError, where=where(ref))
    try:
        cfg = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise PackError(f"{where(ref)}: unreadable {CFG_FILE} ({type(exc).__name__}: {exc})") from None
    cfg = _cfg_fields(cfg, ref)
    metadata = cfg.get("metadata") or {}
    # sae-lens < 6 wrote a flat cfg with "hook_point"; 6.x nests facts under "metadata".
    hook = metadata.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    np_id = metadata.get("neuronpedia_id") or cfg.get("neuronpedia_id")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    shape, dtype = _safetensor_header(directory / WEIGHTS_FILE, "W_dec", ref)
    if shape != (d_sae, d_in):
        raise PackError(f"{where(ref)}: W_dec has shape {list(shape)} but {CFG_FILE} says "
                        f"[d_sae, d_in] = [{d_sae}, {d_in}]")
    _check_dtype(dtype, cfg.get("dtype"), ref)
    return SaeInfo(ref, d_in, d_sae, hook, np_id)


# What each cfg.json key flowdb reads must hold; metadata's string keys are checked alike.
_CFG_STRINGS = ("hook_name", "hook_point", "neuronpedia_id", "dtype")
# safetensors' dtype codes, by the names cfg.json gives them (sae-lens writes "float32",
# some tools "torch.float32").
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _cfg_fields(cfg, ref: SourceRef) -> dict:
    """cfg.json as flowdb reads it, or PackError naming the key that has the wrong shape."""
    if not isinstance(cfg, dict):
        raise PackError(f"{where(ref)}: {CFG_FILE} holds a JSON {_json_kind(cfg)}, not an object "
                        "with d_in, d_sae and dtype")
    for key in ("d_in", "d_sae"):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PackError(f"{where(ref)}: {CFG_FILE} key {key} must be a positive integer, got {value!r}")
    metadata = cfg.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise PackError(f"{where(ref)}: {CFG_FILE} key metadata must be an object, got a JSON "
                        f"{_json_kind(metadata)}")
    for table, prefix in ((cfg, ""), (metadata or {}, "metadata.")):
        for key in _CFG_STRINGS:
            if table.get(key) is not None and not isinstance(table[key], str):
                raise PackError(f"{where(ref)}: {CFG_FILE} key {prefix}{key} must be a string, "
                                f"got a JSON {_json_kind(table[key])}")
    return cfg


def _json_kind(value) -> str:
    kinds = ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"), (list, "list"),
             (dict, "object"), (type(None), "null"))
    return next(name for kind, name in kinds if isinstance(value, kind))


def _check_dtype(found: str, declared: str | None, ref: SourceRef) -> None:
    """W_dec must be floating point, and of the dtype cfg.json declares where it declares one."""
    name = SAFETENSORS_DTYPES.get(found)
    if name is None:
        raise PackError(f"{where(ref)}: W_dec is stored as {found}; a decoder must be floating point "
                        f"({', '.join(SAFETENSORS_DTYPES.values())})")
    if declared is not None and declared.removeprefix("torch.") != name:
        raise PackError(f"{where(ref)}: W_dec is stored as {name} but {CFG_FILE} says dtype {declared!r}")


def _safetensor_header(path: Path, key: str, ref: SourceRef) -> tuple[tuple[int, ...], str]:
    """A tensor's shape and safetensors dtype code (F32, BF16, I8, ...), from the header only."""
    from safetensors import safe_open

    local_file(path, ref)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            if key not in handle.keys():
                raise PackError(f"{where(ref)}: {path.name} has no tensor {key}")
            tensor = handle.get_slice(key)
            return tuple(tensor.get_shape()), tensor.get_dtype()
    except PackError:
        raise
    except Exception as exc:  # safetensors raises its own untyped errors on bad headers
        raise PackError(f"{where(ref)}: unreadable {path.name} ({exc})") from None


NUMPY_LACKS = {"BF16", "F8_E4M3", "F8_E5M2"}  # safetensors dtypes read through torch instead


class SafetensorsRows:
    """A 2-D tensor of a safetensors file, read a slice of rows at a time as float32.

    rows[start:stop] reads just those rows; np.asarray(rows) reads them all. Each read
    maps the file and unmaps it after: rows read earlier do not stay resident, so
    memory holds only the slice asked for, whatever the tensor's size."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, path: Path, key: str, ref: SourceRef):
        self.path, self.key, self.ref = Path(path), key, ref
        with self._open("numpy") as handle:
            tensor = handle.get_slice(key)
            self.shape = tuple(tensor.get_shape())
            self.stored_dtype = tensor.get_dtype()
        if len(self.shape) != 2:
            raise PackError(f"{where(ref)}: {key} has shape {list(self.shape)}, expected [d_sae, d_in]")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("SafetensorsRows reads contiguous row slices only")
        start, stop, _ = rows.indices(self.shape[0])
        return self._read(start, max(start, stop))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self._read(0, self.shape[0])
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def _read(self, start: int, stop: int) -> np.ndarray:
        framework = "pt" if self.stored_dtype in NUMPY_LACKS else "numpy"
        with self._open(framework) as handle:
            try:
                rows = handle.get_slice(self.key)[start:stop]
            except Exception as exc:  # safetensors raises its own untyped errors on bad files
                raise PackError(f"{where(self.ref)}: unreadable {self.path.name} ({exc})") from None
        if framework == "pt":
            rows = rows.float().numpy()
        return np.ascontiguousarray(rows, dtype=np.float32)

    def _open(self, framework: str):
        from safetensors import safe_open

        local_file(self.path, self.ref)
        try:
            return safe_open(str(self.path), framework=framework)
        except Exception as exc:
            raise PackError(f"{where(self.ref)}: unreadable {self.path.name} ({exc})") from None


def _inspect_transcoder(ref: SourceRef) -> tuple[SaeInfo, Path]:
    """A transcoder's shape from its layer file's header, checked against circuit-tracer's
    layout (W_enc and W_dec both [d_transcoder, d_model]); the info and that file."""
    found: TranscoderSet = read_set(ref.location, where(ref))
    file = found.layer_file(ref.layer, where(ref))
    shape, dtype = _safetensor_header(file, "W_dec", ref)
    if len(shape) != 2:
        raise PackError(f"{where(ref)}: {file.name}: W_dec has shape {list(shape)}, expected "
                        "[d_transcoder, d_model]")
    enc_shape, _ = _safetensor_header(file, "W_enc", ref)
    if enc_shape != shape:
        raise PackError(f"{where(ref)}: {file.name}: W_enc has shape {list(enc_shape)} but W_dec "
                        f"{list(shape)}; circuit-tracer stores both as [d_transcoder, d_model]")
    if SAFETENSORS_DTYPES.get(dtype) is None:
        raise PackError(f"{where(ref)}: {file.name}: W_dec is stored as {dtype}; a decoder must be "
                        f"floating point ({', '.join(SAFETENSORS_DTYPES.values())})")
    d_transcoder, d_model = shape
    # The hook as sae-lens names an MLP SAE's, so `flowdb link` finds the two in one space.
    hook = f"blocks.{ref.layer}.{found.output_hook.rsplit('.', 1)[-1]}"
    return SaeInfo(ref, d_model, d_transcoder, hook, None, scan=found.scan), file


def _inspect_npz(ref: SourceRef) -> SaeInfo:
    path = local_file(Path(ref.location), ref)
    try:
        with zipfile.ZipFile(path) as archive, archive.open("W_dec.npy") as member:
            version = np.lib.format.read_magic(member)
            reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, _, _ = reader(member)
    except KeyError:
        raise PackError(f"{where(ref)}: params.npz has no W_dec") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise PackError(f"{where(ref)}: unreadable npz ({exc})") from None
    if len(shape) != 2:
        raise PackError(f"{where(ref)}: W_dec has shape {list(shape)}, expected [d_sae, d_in]")
    return SaeInfo(ref, int(shape[1]), int(shape[0]), None, None)


def _release_lookup(ref: SourceRef):
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        raise PackError(f"{where(ref)}: release sources need sae-lens (pip install 'flowdb[model]')") from None
    lookup = get_pretrained_saes_directory().get(ref.location)
    if lookup is None:
        raise PackError(f"{where(ref)}: sae-lens knows no release {ref.location!r}")
    if ref.sae_id not in lookup.saes_map:
        raise PackError(f"{where(ref)}: release {ref.location} has no sae_id {ref.sae_id!r}")
    return lookup


def _inspect_release(ref: SourceRef) -> SaeInfo:
    lookup = _release_lookup(ref)
    return SaeInfo(ref, None, None, None, lookup.neuronpedia_id.get(ref.sae_id))


def _load_release(ref: SourceRef, tensor: str = "W_dec") -> tuple[SaeInfo, np.ndarray]:
    _release_lookup(ref)
    from sae_lens import SAE

    try:
        sae = SAE.from_pretrained(ref.location, ref.sae_id, device="cpu")
    except Exception as exc:  # hub and conversion errors come in many types
        raise PackError(f"{where(ref)}: sae-lens could not load it ({type(exc).__name__}: {exc})") from None
    metadata = sae.cfg.metadata
    weights = getattr(sae, tensor).detach().float().cpu().numpy()
    info = SaeInfo(ref, int(sae.cfg.d_in), int(sae.cfg.d_sae),
                   getattr(metadata, "hook_name", None), getattr(metadata, "neuronpedia_id", None))
    return info, weights


def check_same_space(info: SaeInfo, residual_d_in: int, *, projected_from: int | None = None) -> None:
    """Cosine matching needs decoder rows in the residual stream's space.

    projected_from: the caller maps this SAE's decoder rows into the residual space
    through the layer's attention output projection (flowdb.packs.projection), whose input
    width (n_heads * head_dim) this is. Then only a hook_z SAE (or one whose hook is
    unknown) of exactly that d_in passes; whether W_O's output width is residual_d_in
    is AttentionOutput.check_space's to check. Without it, nothing else changes."""
    if projected_from is not None:
        if info.hook_name and not info.hook_name.endswith("attn.hook_z"):
            raise PackError(f"{info.where()}: reads {info.hook_name}; only attn.hook_z SAEs are "
                            "projected through the attention output projection W_O")
        if info.d_in is not None and info.d_in != projected_from:
            raise PackError(f"{info.where()}: d_in {info.d_in} differs from the input width "
                            f"{projected_from} (n_heads * head_dim) of the attention output "
                            "projection it is projected through")
        return
    if info.hook_name and info.hook_name.endswith("hook_z"):
        raise PackError(
            f"{info.where()}: reads {info.hook_name} (concatenated attention-head outputs, "
            f"d_in {info.d_in}), not the residual stream (d_in {residual_d_in}); its decoder "
            "rows cannot be cosine-matched to residual features: use attention-output "
            "(hook_attn_out) SAEs")
    if info.d_in is not None and info.d_in != residual_d_in:
        raise PackError(
            f"{info.where()}: d_in {info.d_in} differs from the residual SAEs' d_in "
            f"{residual_d_in}; matching needs every SAE in the residual stream's space "
            "(attention SAEs on hook_z, for one, are not)")


def load_sae(ref: SourceRef, device: str = "cpu"):
    """The whole SAE (encoder included) as a sae-lens module, for running it on a model."""
    from sae_lens import SAE

    if ref.kind == "transcoders":
        raise PackError(f"{where(ref)}: running a transcoder on a model is not supported (steering and "
                        "the experiments run sae-lens SAEs); its flow edges, links and circuit ties are")
    if ref.kind == "npz":
        raise PackError(f"{where(ref)}: running SAEs needs a sae-lens directory or release; "
                        "convert the params.npz with sae-lens first")
    if ref.kind == "path":
        for name in (CFG_FILE, WEIGHTS_FILE):
            local_file(Path(ref.location) / name, ref)
    try:
        if ref.kind == "path":
            return SAE.load_from_disk(ref.location, device=device)
        return SAE.from_pretrained(ref.location, ref.sae_id, device=device)
    except Exception as exc:  # sae-lens raises many types for bad files and hub errors
        raise PackError(f"{where(ref)}: sae-lens could not load it ({type(exc).__name__}: {exc})") from None
