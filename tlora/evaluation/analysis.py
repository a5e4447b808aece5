"""`python -m tlora.analyze RUN_OR_CHECKPOINT`: pictures of what a T-LoRA run learned.

Writes into `<RUN_OR_CHECKPOINT>/analysis/`:
- rank_schedule.png  r(t) for t = 0..999 with the run's rank, min_rank and alpha
- effective_rank.png singular values of each layer's learned update and its effective rank (smallest k
                     holding 95% of the singular-value sum) by kind of layer: self- vs cross-attention on
                     SDXL (the paper's Fig. 4); double blocks' image and text streams and single blocks on FLUX
- effective_rank.json the numbers behind it
- samples_grid.png   a checkpoint's samples: prompts as rows, images as columns, captions under rows
- loss.png           the loss curve, from logs/loss.csv
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from tlora.common.commands import run_command
from tlora.common.errors import UsageError
from tlora.common.files import atomic_write, check_writable
from tlora.common.flags import Parser
from tlora.common.images import open_rgb
from tlora.common.messages import note
from tlora.families import Family
from tlora.generate.generation import existing_images
from tlora.method.adapters import branches, factors
from tlora.method.settings import TLoRASettings
from tlora.runs.hparams import from_hparams
from tlora.runs.keys import group
from tlora.runs.reading import read
from tlora.runs.run_folder import RunFolder, resolve
from tlora.train.loss_log import read_loss_log

THRESHOLD = 0.95


def effective_rank(singular_values: torch.Tensor, threshold: float = THRESHOLD) -> int:
    """Smallest k whose k largest singular values hold `threshold` of their sum."""
    s = singular_values.double().sort(descending=True).values
    if s.sum() <= 0:
        return 0
    share = s.cumsum(0) / s.sum()
    return int((share < threshold - 1e-12).sum().item()) + 1


def layer_updates(weights: dict[str, torch.Tensor], trainer_type: str) -> dict[str, torch.Tensor]:
    """Adapter key prefix -> learned update (out x in) with every rank component active."""
    updates = {}
    for prefix, params in group(weights).items():
        down, up = factors(branches(params, trainer_type))
        updates[prefix] = up @ down
    return updates


def run_and_checkpoint(target: Path) -> tuple[RunFolder, Path | None]:
    """(run, checkpoint folder or None) for a run folder (its newest usable checkpoint; None when it has none yet)
    or one of its checkpoint-N folders (used as is)."""
    if target.is_file():
        raise UsageError(f"{target} is a file; pass its run folder or one of the run's checkpoint-N folders")
    run = RunFolder.holding(target)
    if run is None:
        raise UsageError(f"{target} is neither a run folder (with logs/hparams.yml) nor one of its checkpoints; pass "
                         "one")
    return run, resolve(target).checkpoint


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rank_schedule(s: TLoRASettings, path: Path) -> list[float]:
    """r(t) for t = 0..T-1 as the T-LoRA masks it (whole-number ticks); returns the rank axis' ticks."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    t = torch.arange(s.num_train_timesteps)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(t, s.active_rank(t))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    mask = f"r_min={s.min_rank}, alpha={s.alpha_rank_scale}" if s.timestep_dependent else "no mask"
    ax.set(xlabel="timestep t", ylabel="active rank r(t)", title=f"{s.trainer_class}: r={s.lora_rank}, {mask}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    ticks = [float(v) for v in ax.get_yticks()]
    plt.close(fig)
    return ticks


def analyse_updates(family: type[Family], weights: dict[str, torch.Tensor], settings: TLoRASettings
                    ) -> dict[str, dict]:
    out = {}
    for prefix, update in layer_updates(weights, settings.trainer_type).items():
        s = torch.linalg.svdvals(update.double())
        out[prefix] = {"kind": family.layer_kind(prefix), "effective_rank": effective_rank(s),
                       "singular_values": s[:128].tolist()}
    return out


def plot_effective_rank(layers: dict[str, dict], kinds: dict[str, str], path: Path) -> None:
    """Spectra and effective ranks, one colour per kind of layer (`kinds`: kind -> label)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for (kind, label), colour in zip(kinds.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        group = [v for v in layers.values() if v["kind"] == kind]
        for i, v in enumerate(group):
            s = torch.tensor(v["singular_values"])
            left.plot(s / max(float(s[0]), 1e-12), color=colour, alpha=0.3, label=label if i == 0 else None)
        right.hist([v["effective_rank"] for v in group], bins=20, alpha=0.6, color=colour, label=label)
    left.set(xlabel="index", ylabel="singular value / largest", title="Spectra of the learned updates", yscale="log")
    right.set(xlabel=f"effective rank ({int(THRESHOLD * 100)}% of the singular-value sum)", ylabel="layers",
              title="Effective rank per layer")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def samples_grid(version_folder: Path, path: Path, caption_height: int = 24) -> bool:
    """Prompts as rows (captioned underneath), images as columns; False when there are no samples (an image that
    cannot be read is left out, with a note)."""
    rows = [(p.name, images) for p in sorted(version_folder.iterdir())
            if p.is_dir() and (images := _readable(existing_images(p)))]
    if not rows:
        return False
    w, h = rows[0][1][0].size
    cols = max(len(images) for _, images in rows)
    canvas = Image.new("RGB", (cols * w, len(rows) * (h + caption_height)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (caption, images) in enumerate(rows):
        top = r * (h + caption_height)
        for c, image in enumerate(images):
            canvas.paste(image.resize((w, h)), (c * w, top))
        draw.text((4, top + h + 4), caption, fill="black")
    canvas.save(path)
    return True


def _readable(paths: list[Path]) -> list[Image.Image]:
    images = []
    for image in paths:
        try:
            images.append(open_rgb(image))
        except Exception:  # PIL raises many types for bad files
            note(f"samples_grid.png leaves out {image}: it is not a readable image")
    return images


def plot_loss(rows: list[tuple[int, float]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([s for s, _ in rows], [v for _, v in rows], lw=0.8)
    ax.set(xlabel="step", ylabel="loss", title="Training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def analyze(target: str | Path) -> Path:
    """Write every picture that the run or checkpoint allows, saying which it could not draw and why; returns
    the analysis folder (inside `target`, wherever the run was written). Everything is read and checked before
    anything is written."""
    target = Path(target)
    run, checkpoint = run_and_checkpoint(target)
    hparams_path = run.hparams_path
    hparams = run.hparams()
    ckpt = read(checkpoint, hparams_path, fix=f"add {{key}} to {hparams_path}") if checkpoint is not None else None
    settings = ckpt.settings if ckpt is not None else from_hparams(hparams, str(hparams_path))
    weights = ckpt.tensors() if ckpt is not None else None
    try:
        loss = read_loss_log(run.loss_log, "training writes it; delete it to analyse without it")
    except UsageError as err:
        note(f"no loss.png: {err}")
        loss = None
    out = target / "analysis"
    check_writable(out, str(target), "copy the run to a folder you can write to")
    if old := run.moved_from(hparams):  # said once the input is known to be good
        note(f"{run.name} was written in {old}; reading it where it is, {run.path}")
    out.mkdir(exist_ok=True)
    if ckpt is not None:
        layers = analyse_updates(ckpt.family, weights, settings)
        atomic_write(out / "effective_rank.json", json.dumps(layers, indent=1).encode())
        plot_effective_rank(layers, ckpt.family.layer_kinds, out / "effective_rank.png")
        versions = sorted(checkpoint.glob("samples/*/version_*"))
        if not (versions and samples_grid(versions[0], out / "samples_grid.png")):
            note(f"no samples_grid.png: {checkpoint} has no samples (inference.py writes them)")
    else:
        note(f"no effective_rank.png or samples_grid.png: {run.path} has no checkpoint yet")
    plot_rank_schedule(settings, out / "rank_schedule.png")
    if loss:
        plot_loss(loss, out / "loss.png")
    elif loss is not None:
        note(f"no loss.png: {run.loss_log} is missing or empty")
    return out


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("target", help="A run folder or one of its checkpoint-N folders.")

    def run(args) -> Path:
        out = analyze(args.target)
        for f in sorted(out.iterdir()):
            print(f"  {f.name}")
        return out

    return run_command(p.parse_args, run, "analysis", argv)


if __name__ == "__main__":
    sys.exit(main())
