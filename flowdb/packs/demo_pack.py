"""`flowdb demo-pack build`: SAEs for SmolLM2-135M trained here, offline.

For each layer in range, a residual-stream (resid_post), MLP-output and
attention-output SAE, trained with sae-lens's SAETrainer on offline text
(flowdb/texts.py) and saved in sae-lens's format under FLOWDB_HOME/packs/<name>/
with a manifest for `flowdb ingest`. Architectures:
  jumprelu  (default) JumpReLU, as Gemma Scope: per-feature thresholds trained with
            sae-lens's quadratic L0 loss towards the target L0 (Gemma Scope 2's)
  topk      TopK with k = the target L0
Activations stream to disk in half precision, a group of layers at a time, so the
token count is bounded by disk, not memory. The first position of every window is
left out of training and evaluation: it is the attention sink, with a norm far
above the rest. Per SAE, on held-out tokens: explained variance, L0, dead fraction.

A built pack is never overwritten or deleted: its files are what a stored graph
was matched on (ingest records their digests). Other settings need another name.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from flowdb.errors import FlowdbError
from flowdb.lm.hooks import MODULE_HOOKS, hook_point
from flowdb.packs.manifest import check_pack_name
from flowdb.progress import disabled
from flowdb.settings import flowdb_home, home_dir

ARCHITECTURES = ("jumprelu", "topk")
MODEL_LAYERS = 30  # SmolLM2-135M's decoder layers: hook points 0-29


@dataclass(frozen=True)
class DemoPackSpec:
    name: str = "smollm2-135m-demo"
    model: str = "smollm2-135m"
    first_layer: int = 2
    last_layer: int = 9
    architecture: str = "jumprelu"
    width: int = 2048
    l0: int = 48  # JumpReLU's target L0; TopK's k
    context: int = 128
    per_text: int = 4  # consecutive windows taken from one text at most
    train_tokens: int = 200_000
    eval_tokens: int = 8_000
    samples: int = 300_000  # training samples per SAE (steps x batch)
    batch: int = 1024  # on a CPU, smaller batches cost the same per sample and give more steps
    lr: float = 3e-3
    l0_coefficient: float = 2.0
    init_threshold: float = 0.3  # in units where inputs have norm sqrt(d); lower starts too dense
    texts: str = "mixed"
    group_layers: int = 30  # layers whose activations are on disk at once
    device: str = "cpu"
    seed: int = 0

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.last_layer + 1)


# What each budget spends its time on (wall times measured on 2 CPU cores; README).
BUDGETS = {
    "tiny": DemoPackSpec(name="smollm2-135m-demo-tiny", first_layer=2, last_layer=4, width=512, l0=16,
                         per_text=2, train_tokens=12_000, eval_tokens=2_000, samples=60_000, batch=512),
    "default": DemoPackSpec(),
    "large": DemoPackSpec(name="smollm2-135m-demo-large", first_layer=0, last_layer=29, width=8192, l0=64,
                          per_text=16, train_tokens=8_000_000, eval_tokens=50_000, samples=40_000_000,
                          batch=4096, group_layers=1, device="cuda"),  # shards: 3 x 9 GB on disk at once
}


def budget_spec(budget: str, **overrides) -> DemoPackSpec:
    if budget not in BUDGETS:
        raise FlowdbError(f"no budget named {budget!r}; known: {', '.join(BUDGETS)}")
    spec = replace(BUDGETS[budget], **{k: v for k, v in overrides.items() if v is not None})
    check_pack_name(spec.name)
    if spec.architecture not in ARCHITECTURES:
        raise FlowdbError(f"architecture must be one of {', '.join(ARCHITECTURES)}")
    if not 0 <= spec.first_layer <= spec.last_layer:
        raise FlowdbError(f"layer range {spec.first_layer}-{spec.last_layer} is empty")
    return spec


def pack_dir(spec: DemoPackSpec) -> Path:
    return flowdb_home() / "packs" / spec.name


def manifest_text(spec: DemoPackSpec) -> str:
    lines = [f"# {spec.architecture} SAEs (width {spec.width}, L0 {spec.l0}) for {spec.model}, trained by",
             "# `flowdb demo-pack build` on offline text; quality.csv holds each SAE's figures.",
             f'name = "{spec.name}"', f'model = "{spec.model}"', f"layers = [{spec.first_layer}, {spec.last_layer}]",
             "", "[match]", "k = 5"]
    for module in MODULE_HOOKS:
        lines += ["", f"[modules.{module}]",
                  f'path = "{{flowdb_home}}/packs/{spec.name}/saes/{module}/layer_{{layer}}"']
    return "\n".join(lines) + "\n"


def _collect(model, windows, layers: range, directory: Path, device: str, progress) -> dict[str, np.memmap]:
    """Activations [tokens, d_model] in half precision, one file per hook point of
    `layers`, written batch by batch (memory holds one batch)."""
    import torch

    from flowdb.lm.hooks import capture, forward_until

    names = [hook_point(module, layer) for layer in layers for module in MODULE_HOOKS]
    d_model = model.config.hidden_size
    rows = len(windows) * (windows.shape[1] - 1)
    shards = {name: np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=np.float16,
                                              shape=(rows, d_model)) for name in names}
    at = 0
    with torch.no_grad():
        for start in progress(range(0, len(windows), 16)):
            chunk = windows[start:start + 16].to(device)
            with capture(model, names) as acts:
                forward_until(model, chunk, layers[-1])
            n = chunk.shape[0] * (chunk.shape[1] - 1)
            for name in names:
                shards[name][at:at + n] = acts[name][:, 1:].reshape(n, d_model).half().cpu().numpy()
            at += n
    for shard in shards.values():
        shard.flush()
    return shards


def _train_one(shard: np.ndarray, spec: DemoPackSpec, seed: int):
    """An SAE by sae-lens's trainer. Inputs are scaled to mean norm sqrt(d) (so one
    learning rate suits every layer, whose norms differ tenfold) and b_dec starts at
    their mean; the scale is folded back into the weights before saving."""
    import torch
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    d_in = shard.shape[1]
    sample = torch.from_numpy(np.asarray(shard[:: max(1, len(shard) // 20_000)])).float()
    scale = float(d_in ** 0.5 / sample.norm(dim=1).mean())
    if spec.architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=spec.width, k=spec.l0, device=spec.device))
    else:
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
            d_in=d_in, d_sae=spec.width, jumprelu_sparsity_loss_mode="quadratic", target_l0=spec.l0,
            l0_coefficient=spec.l0_coefficient, jumprelu_init_threshold=spec.init_threshold, device=spec.device))
    sae.b_dec.data = (sample.mean(0) * scale).to(spec.device)
    generator = np.random.default_rng(seed)

    def batches():
        while True:
            rows = np.sort(generator.integers(0, len(shard), spec.batch))
            yield torch.from_numpy(shard[rows]).to(spec.device).float() * scale

    steps = max(1, spec.samples // spec.batch)
    config = SAETrainerConfig(
        total_training_samples=steps * spec.batch, train_batch_size_samples=spec.batch, lr=spec.lr,
        lr_end=spec.lr / 10, lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=steps // 5,
        n_restart_cycles=1, adam_beta1=0.9, adam_beta2=0.999, device=spec.device, autocast=False,
        dead_feature_window=1_000, feature_sampling_window=1_000, n_checkpoints=0, checkpoint_path=None,
        save_final_checkpoint=False, logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=20)
    with contextlib.redirect_stderr(io.StringIO()):  # the trainer's own bar would interleave with ours
        trained = SAETrainer(config, sae, batches()).fit()
    trained.fold_activation_norm_scaling_factor(scale)
    return trained


def sae_quality(sae, activations) -> dict:
    """Explained variance, L0 and dead fraction of an SAE on activations [n, d]."""
    import torch

    with torch.no_grad():
        x = torch.as_tensor(np.asarray(activations)).float().to(sae.W_dec.device)
        codes = sae.encode(x)
        recon = sae.decode(codes)
        residual = ((x - recon) ** 2).sum()
        total = ((x - x.mean(0)) ** 2).sum()
        active = codes > 0
    return {"explained_variance": float(1 - residual / total), "l0": float(active.sum(1).float().mean()),
            "dead_fraction": float((~active.any(0)).float().mean())}


def _cached(out: Path, spec: DemoPackSpec) -> pd.DataFrame | None:
    spec_file, quality_file = out / "spec.json", out / "quality.csv"
    if not out.exists():
        return None
    if spec_file.exists() and quality_file.exists() and json.loads(spec_file.read_text()) == asdict(spec):
        return pd.read_csv(quality_file)
    raise FlowdbError(f"{out} holds a pack built with other settings (see its spec.json); a stored graph may "
                      f"have been matched on it, so it is kept: give this build another --name")


def build_demo_pack(spec: DemoPackSpec = DemoPackSpec(), model_and_tokenizer=None,
                    show_progress: bool | None = None) -> tuple[Path, pd.DataFrame]:
    """Train (or reuse) the pack; returns its directory and the quality table.
    The pack is assembled in a private directory and renamed into place when done."""
    out = pack_dir(spec)
    cached = _cached(out, spec)
    if cached is not None:
        return out, cached
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=home_dir("packs")))
    try:
        quality = _build(spec, work, model_and_tokenizer, show_progress)
        try:
            os.rename(work, out)  # refuses when another build finished first
        except OSError:
            raise FlowdbError(f"{out} appeared while this build ran (another build?); it is kept") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out, quality


def _build(spec: DemoPackSpec, work: Path, model_and_tokenizer, show_progress) -> pd.DataFrame:
    from sae_lens import SAE
    from tqdm.auto import tqdm

    from flowdb.lm.loader import load_model
    from flowdb.lm.texts import token_windows

    disable = disabled(show_progress)
    started = time.perf_counter()
    model, tokenizer = model_and_tokenizer or load_model(spec.model, spec.device)
    tokens_per_window = spec.context - 1  # the sink is dropped
    n_train = -(-spec.train_tokens // tokens_per_window)
    n_eval = -(-spec.eval_tokens // tokens_per_window)
    # Evaluation windows come first in the seeded order, training windows after them.
    windows = token_windows(tokenizer, spec.texts, n_eval + n_train, spec.context, spec.seed, spec.per_text)
    held_out_rows = n_eval * tokens_per_window
    rows = []
    total_jobs = len(spec.layers) * len(MODULE_HOOKS)
    groups = [spec.layers[i:i + spec.group_layers] for i in range(0, len(spec.layers), spec.group_layers)]
    training = tqdm(total=total_jobs, desc="training SAEs", disable=disable, position=1)
    for group in groups:
        shards_dir = work / "activations"
        shards_dir.mkdir()
        bar = lambda it, group=group: tqdm(it, desc=f"activations, layers {group[0]}-{group[-1]}",  # noqa: E731
                                           disable=disable, position=0, leave=False)
        shards = _collect(model, windows, group, shards_dir, spec.device, bar)
        for layer in group:
            for index, module in enumerate(MODULE_HOOKS):
                hook = hook_point(module, layer)
                shard = shards[hook]
                directory = work / "saes" / module / f"layer_{layer}"
                trained = _train_one(shard[held_out_rows:], spec, seed=spec.seed * 1000 + layer * 3 + index)
                trained.save_inference_model(str(directory))
                cfg_path = directory / "cfg.json"
                cfg = json.loads(cfg_path.read_text())
                cfg["metadata"].update(model_name=spec.model, hook_name=hook)
                cfg_path.write_text(json.dumps(cfg, indent=2))
                sae = SAE.load_from_disk(str(directory), device=spec.device)  # measure what users will load
                rows.append({"module": module, "layer": layer, **sae_quality(sae, shard[:held_out_rows])})
                training.update()
        del shards
        shutil.rmtree(shards_dir)
    training.close()
    quality = pd.DataFrame(rows)
    quality.to_csv(work / "quality.csv", index=False)
    (work / "manifest.toml").write_text(manifest_text(spec))
    (work / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    (work / "build_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return quality
