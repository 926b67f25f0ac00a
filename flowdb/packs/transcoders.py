"""Transcoder sets as a pack's MLP module: circuit-tracer's per-layer transcoders.

A set is a local directory as circuit-tracer writes one (TranscoderSet.to_safetensors,
save_transcoders_to_cache):

    config.yaml               model_kind: transcoder_set, feature_input_hook (e.g.
                              hook_resid_mid), feature_output_hook: hook_mlp_out, scan,
                              model_name; optionally transcoders: [per-layer files]
    layer_{i}.safetensors     W_enc [d_transcoder, d_model], W_dec [d_transcoder, d_model],
                              b_enc, b_dec, optional activation_function.threshold, W_skip

A transcoder at layer L reads the residual stream and writes block L's MLP output, so its
decoder rows live where an MLP SAE's do: in the manifest it fills [modules.mlp]
(`transcoders = "DIR"`) and flowdb.packs.sources reads its rows like an SAE's. This module
knows the set's layout only: its config and which file holds which layer.

Refused, each in one line: a cross-layer transcoder (its decoders write every later
layer's MLP output, so no one slot holds them), an output hook other than hook_mlp_out,
hf:// entries and Gemma Scope params.npz entries in `transcoders` (read locally and in
circuit-tracer's safetensors layout only), a config that does not parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flowdb.errors import PackError
from flowdb.files import read_config_text

CONFIG_FILE = "config.yaml"
MODEL_KIND = "transcoder_set"
OUTPUT_HOOK = "hook_mlp_out"  # what a transcoder's decoder must write to stand in the mlp slot


@dataclass(frozen=True)
class TranscoderSet:
    directory: Path
    scan: str  # circuit-tracer's name for the set; attribution graphs carry it as metadata.scan
    input_hook: str | None
    output_hook: str
    model_name: str | None
    files: tuple[str, ...] | None  # config's `transcoders` list, where it has one

    @property
    def config(self) -> Path:
        return self.directory / CONFIG_FILE

    def layer_file(self, layer: int, where: str) -> Path:
        """The file of layer `layer`: the config's transcoders[layer] (relative to the set),
        else layer_{layer}.safetensors, as circuit-tracer's cache names them."""
        if self.files is None:
            return self.directory / f"layer_{layer}.safetensors"
        field = f"{self.config}: transcoders[{layer}]"
        if layer >= len(self.files):
            raise PackError(f"{where}: {self.config}: transcoders lists {len(self.files)} layer file(s), "
                            f"none for layer {layer}")
        entry = self.files[layer]
        if entry.startswith("hf://"):
            raise PackError(f"{where}: {field} is {entry!r}; flowdb reads local files only: save the set "
                            "with circuit-tracer's save_transcoders_to_cache and name that directory")
        if not entry.endswith(".safetensors"):
            raise PackError(f"{where}: {field} is {entry!r}; flowdb reads circuit-tracer's safetensors "
                            "layout only (Gemma Scope params.npz: save it with save_transcoders_to_cache)")
        return self.directory / entry


def read_set(directory: str | Path, where: str) -> TranscoderSet:
    """The set's config.yaml, checked; PackError in one line naming the file and the field.
    where: what the message starts with (the layer, module and source)."""
    import yaml

    directory = Path(directory)
    config = directory / CONFIG_FILE
    text = read_config_text(directory, CONFIG_FILE, error=PackError, where=where)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise PackError(f"{where}: unreadable {config} (YAML: {getattr(exc, 'problem', None) or exc}{at})") from None
    if not isinstance(raw, dict):
        raise PackError(f"{where}: {config} holds no mapping of model_kind, feature_output_hook, ...")

    def text(key: str, required: bool = True) -> str | None:
        value = raw.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise PackError(f"{where}: {config}: {key} must be a string, got {value!r}")
        return value

    kind = text("model_kind")
    if kind == "cross_layer_transcoder":
        raise PackError(f"{where}: {config}: model_kind is cross_layer_transcoder; a cross-layer "
                        "transcoder's decoders write the MLP output of every later layer, not one, so "
                        "no slot of a flow pack holds them: flowdb takes per-layer transcoder_set only")
    if kind != MODEL_KIND:
        raise PackError(f"{where}: {config}: model_kind must be {MODEL_KIND!r}, got {kind!r}")
    output_hook = text("feature_output_hook")
    if output_hook.rsplit(".", 1)[-1] != OUTPUT_HOOK:
        raise PackError(f"{where}: {config}: feature_output_hook is {output_hook!r}; a transcoder set "
                        f"stands in the mlp slot only when it writes the MLP output ({OUTPUT_HOOK})")
    files = raw.get("transcoders")
    if files is not None and (not isinstance(files, list)
                              or not all(isinstance(f, str) and f for f in files)):
        raise PackError(f"{where}: {config}: transcoders must be a list of file paths, got {files!r}")
    # circuit-tracer names a cached set without a scan by its directory (load_transcoders_from_cache).
    scan = text("scan", required=False) or str(directory)
    return TranscoderSet(directory, scan, text("feature_input_hook", required=False), output_hook,
                         text("model_name", required=False), tuple(files) if files is not None else None)
