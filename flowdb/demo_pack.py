"""`flowdb demo-pack build`: SAEs for SmolLM2-135M trained here, offline.

For each layer in range, a residual-stream (resid_post), MLP-output and
attention-output TopK SAE, trained with sae-lens's SAETrainer on activations of
the Python standard library's source, and saved in sae-lens's format under
FLOWDB_HOME/packs/<name>/ (cached: a second build with the same settings does
nothing). The first position of every window is left out of training and
evaluation: it is the attention sink, with a norm far above the rest.
Per SAE, on held-out windows: explained variance, L0 and the dead fraction.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from flowdb.hooks import MODULE_HOOKS, hook_point
from flowdb.settings import flowdb_home


@dataclass(frozen=True)
class DemoPackSpec:
    name: str = "smollm2-135m-demo"
    model: str = "smollm2-135m"
    first_layer: int = 0
    last_layer: int = 29
    width: int = 2048
    k: int = 32
    context: int = 128
    train_windows: int = 128  # x (context - 1) training tokens
    eval_windows: int = 16
    steps: int = 120
    batch: int = 512
    lr: float = 3e-3
    texts: str = "python-stdlib"
    seed: int = 0

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.last_layer + 1)


def pack_dir(spec: DemoPackSpec) -> Path:
    return flowdb_home() / "packs" / spec.name


def _collect(model, tokenizer, spec: DemoPackSpec, n_windows: int, seed: int, progress) -> dict:
    """Activations [tokens, d_model] at every hook point the pack trains on."""
    import torch

    from flowdb.hooks import capture
    from flowdb.texts import token_windows

    windows = token_windows(tokenizer, spec.texts, n_windows, spec.context, seed)
    names = [hook_point(module, layer) for layer in spec.layers for module in MODULE_HOOKS]
    stored = {name: [] for name in names}
    with torch.no_grad():
        for start in progress(range(0, n_windows, 8)):
            with capture(model, names) as acts:
                model(windows[start:start + 8])
            for name in names:
                stored[name].append(acts[name][:, 1:].reshape(-1, acts[name].shape[-1]).half())
    return {name: torch.cat(parts) for name, parts in stored.items()}


def _train_one(activations, spec: DemoPackSpec, seed: int):
    """A TopK SAE by sae-lens's trainer. Inputs are scaled to mean norm sqrt(d) (so one
    learning rate suits every layer, whose norms differ tenfold) and b_dec starts at
    their mean; the scale is folded back into the weights before saving."""
    import torch
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    d_in = activations.shape[1]
    scale = float(d_in ** 0.5 / activations.float().norm(dim=1).mean())
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=spec.width, k=spec.k))
    sae.b_dec.data = activations.float().mean(0) * scale
    generator = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            rows = torch.randint(0, activations.shape[0], (spec.batch,), generator=generator)
            yield activations[rows].float() * scale

    config = SAETrainerConfig(
        total_training_samples=spec.steps * spec.batch, train_batch_size_samples=spec.batch, lr=spec.lr,
        lr_end=spec.lr / 10, lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=0,
        n_restart_cycles=1, adam_beta1=0.9, adam_beta2=0.999, device="cpu", autocast=False,
        dead_feature_window=10_000, feature_sampling_window=10_000, n_checkpoints=0, checkpoint_path=None,
        save_final_checkpoint=False, logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=20)
    with contextlib.redirect_stderr(io.StringIO()):  # the trainer's own bar would interleave with ours
        trained = SAETrainer(config, sae, batches()).fit()
    trained.fold_activation_norm_scaling_factor(scale)
    return trained


def sae_quality(sae, activations) -> dict:
    """Explained variance, L0 and dead fraction of an SAE on activations [n, d]."""
    import torch

    with torch.no_grad():
        x = activations.float()
        codes = sae.encode(x)
        recon = sae.decode(codes)
        residual = ((x - recon) ** 2).sum()
        total = ((x - x.mean(0)) ** 2).sum()
        active = codes > 0
    return {"explained_variance": float(1 - residual / total), "l0": float(active.sum(1).float().mean()),
            "dead_fraction": float((~active.any(0)).float().mean())}


def build_demo_pack(spec: DemoPackSpec = DemoPackSpec(), model_and_tokenizer=None, force: bool = False,
                    show_progress: bool | None = None) -> tuple[Path, pd.DataFrame]:
    """Train (or reuse) the pack; returns its directory and the quality table."""
    from sae_lens import SAE
    from tqdm.auto import tqdm

    from flowdb.models import load_model

    out = pack_dir(spec)
    spec_file, quality_file = out / "spec.json", out / "quality.csv"
    if not force and spec_file.exists() and quality_file.exists() \
            and json.loads(spec_file.read_text()) == asdict(spec):
        return out, pd.read_csv(quality_file)
    shutil.rmtree(out, ignore_errors=True)
    disable = None if show_progress is None else not show_progress
    started = time.perf_counter()
    model, tokenizer = model_and_tokenizer or load_model(spec.model)
    bar = lambda it: tqdm(it, desc="activations", disable=disable)  # noqa: E731
    collected = _collect(model, tokenizer, spec, spec.train_windows + spec.eval_windows, spec.seed, bar)
    n_train = spec.train_windows * (spec.context - 1)  # windows come first-to-last, sink dropped
    train = {name: acts[:n_train] for name, acts in collected.items()}
    held_out = {name: acts[n_train:] for name, acts in collected.items()}
    rows = []
    jobs = [(layer, module) for layer in spec.layers for module in MODULE_HOOKS]
    for layer, module in tqdm(jobs, desc="training SAEs", disable=disable):
        hook = hook_point(module, layer)
        directory = out / "saes" / module / f"layer_{layer}"
        trained = _train_one(train[hook], spec, seed=spec.seed * 1000 + layer * 3 + list(MODULE_HOOKS).index(module))
        trained.save_inference_model(str(directory))
        cfg_path = directory / "cfg.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["metadata"].update(model_name=spec.model, hook_name=hook)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        sae = SAE.load_from_disk(str(directory))  # measure what was saved, as users will load it
        rows.append({"module": module, "layer": layer, **sae_quality(sae, held_out[hook])})
    quality = pd.DataFrame(rows)
    quality.to_csv(quality_file, index=False)
    spec_file.write_text(json.dumps(asdict(spec), indent=2))
    (out / "build_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return out, quality
