"""`python -m tlora.export CHECKPOINT --format FORMAT --out PATH`: a T-LoRA as a file other tools load.

A standard LoRA has no timestep mask, so its mask is fixed (`--mask full`: every rank component, as at
t = 0; or `--mask timestep:T`: the components active at T). With a fixed mask M the update is exactly a LoRA:

    lora:        B M A                         = B[:, kept] @ A[kept]                      (rank <= r)
    ortho_lora:  P L M Q - P0 L0 M Q0          = [P, -P0] @ [L M Q ; L0 M Q0]              (rank <= 2r)

Components that are exactly zero are dropped; nothing is approximated unless `--rank K` asks for the best
rank-K approximation of each layer (its relative error is printed).

Formats: `diffusers` (the family pipeline's save_lora_weights layout and metadata), `kohya` (kohya-style keys,
which ComfyUI, A1111/Forge and diffusers load: SDXL's original UNet names; FLUX's BFL names with q, k, v
fused as the original models fuse them), `diffusers-scheduled` (a folder of standard LoRA chunks and a
schedule that `tlora.scheduled` switches per denoising step: the exact T-LoRA), `authors` (exactly the
authors' files: SDXL pytorch_lora_weights.safetensors, FLUX.1 lora.pt with every key their loader expects).
Where the file's model fuses projections that the T-LoRA adapts one by one (FLUX kohya files, FLUX.2's
single blocks), their factors are fused exactly: downs stacked, ups side by side at their rows. A denoiser of two
models that load LoRAs one by one (Wan 2.2 A14B's experts) gets a file each, `--out` with a suffix
(dog.safetensors -> dog_high_noise.safetensors, dog_low_noise.safetensors; Family.export_files).

Settings are read as tlora.load reads them (the file's metadata, the run's hparams.yml, --config_path, the
flags below); a timestep mask or schedule is never built on a guessed min_rank, alpha or trainer_class.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save

from tlora.common.commands import run_command
from tlora.common.errors import RunFailed, UsageError
from tlora.common.files import atomic_write, check_writable, is_write_failure, write_failure
from tlora.common.flags import Parser
from tlora.common.messages import NEW_PATH, note
from tlora.common.values import check_count, shown
from tlora.families.base import Family, Target
from tlora.formats import AUTHORS, diffusers_lora, diffusers_scheduled, kohya
from tlora.method.adapters import PARAMS, branches, factors
from tlora.method.settings import TLoRASettings
from tlora.runs.keys import flatten, group
from tlora.runs.reading import LYCORIS_REFUSAL, Checkpoint, read
from tlora.runs.weights import save_pickle

FORMATS = ("diffusers", "kohya", "diffusers-scheduled", "authors")
BAKED = ("min_rank",)  # a timestep mask or schedule is never built on a guess of these (others: a note)
FIX = "pass --{key} or --config_path RUN/logs/hparams.yml"
FILE_LAYERS = {"diffusers": diffusers_lora.layers, "kohya": kohya.layers}  # how each format names the family's layers

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (down (k x in), up (out x k))


def components(params: dict[str, torch.Tensor], trainer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of one adapter (its parameters by name) with every component, in mask order, in float64: row/column
    i is rank component i (ortho_lora: 2r, component i of the trained branch then of the frozen one)."""
    return factors(branches({name: v.double() for name, v in params.items()}, trainer_type))


def select(family: type[Family], weights: dict[str, torch.Tensor], settings: TLoRASettings, first: int, end: int,
           drop_zero: bool) -> Factors:
    """Every layer's LoRA factors (by the `family` denoiser's module path) for rank components first..end-1
    (ortho_lora: of both paths), float32; `drop_zero` drops components that are exactly zero (and layers left with
    none)."""
    trainer_type = settings.trainer_type
    out: Factors = {}
    for prefix, params in sorted(group(weights).items()):
        down, up = components(params, trainer_type)
        rank = down.shape[0] if trainer_type == "lora" else down.shape[0] // 2
        index = torch.arange(first, min(end, rank))
        index = index if trainer_type == "lora" else torch.cat([index, index + rank])
        down, up = down[index], up[:, index]
        if drop_zero:
            nonzero = (down != 0).any(dim=1) & (up != 0).any(dim=0)
            down, up = down[nonzero], up[:, nonzero]
        if len(down):
            out[family.module_path(prefix)] = (down.float().contiguous(), up.float().contiguous())
    return out


def fuse(factors: Factors, targets: list[Target]) -> Factors:
    """Each target layer's LoRA from its projections' factors, exactly: the downs stacked, each up placed at its
    projection's rows and its own columns (block-diagonal); rows no projection adapts stay zero."""
    out: Factors = {}
    for target in targets:
        members = [(row, *factors[module]) for module, row in target.parts.items()]
        down = torch.cat([d for _, d, _ in members])
        up = torch.zeros(target.out_features, down.shape[0], dtype=down.dtype)
        column = 0
        for row, d, u in members:
            up[row:row + u.shape[0], column:column + d.shape[0]] = u
            column += d.shape[0]
        out[target.name] = (down.contiguous(), up)
    return out


def layout(factors: Factors, family: type[Family], fmt: str, meta: dict[str, str]) -> Factors:
    """The projections' factors as the layers of a `diffusers` or `kohya` file of the family (as that format names
    the family's layers: tlora.formats)."""
    widths = {module: up.shape[0] for module, (_, up) in factors.items()}
    return fuse(factors, FILE_LAYERS[fmt](family, widths, meta))


def split(factors: Factors, files: dict[str, str]) -> dict[str, Factors]:
    """The factors of each export file (Family.export_files: suffix -> its layers' path prefix, cut off there)."""
    return {suffix: {m.removeprefix(prefix): f for m, f in factors.items() if m.startswith(prefix)}
            for suffix, prefix in files.items()}


def file_name(out: Path, suffix: str) -> Path:
    """An export file's path: `out` with its suffix before the extension (dog.safetensors -> dog_high_noise...)."""
    return out.with_name(f"{out.stem}{suffix}{out.suffix}") if suffix else out


def fixed_mask_factors(family: type[Family], weights: dict[str, torch.Tensor], settings: TLoRASettings,
                       active: int | None) -> Factors:
    """Every layer's update under a fixed mask (the first `active` components; None = all) as exact LoRA
    factors, components that are exactly zero dropped."""
    return select(family, weights, settings, 0, settings.lora_rank if active is None else active, drop_zero=True)


def best_rank(down: torch.Tensor, up: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-k approximation of up @ down (Eckart-Young) and its relative Frobenius error, through
    QR of the thin factors (no SVD of the full out x in matrix)."""
    if down.shape[0] <= k:
        return down, up, 0.0
    qu, ru = torch.linalg.qr(up.double())
    qd, rd = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(ru @ rd.T)
    root = s[:k].sqrt()
    error = float((s[k:].square().sum() / s.square().sum()).sqrt()) if s.square().sum() > 0 else 0.0
    return (root[:, None] * (vh[:k] @ qd.T)).float(), ((qu @ u[:, :k]) * root).float(), error


def truncate(factors: Factors, k: int) -> tuple[Factors, list[float]]:
    out, errors = {}, []
    for name, (down, up) in factors.items():
        d, u, err = best_rank(down, up, k)
        out[name] = (d.contiguous(), u.contiguous())
        errors.append(err)
    return out, errors


def scheduled_files(family: type[Family], weights: dict[str, torch.Tensor], settings: TLoRASettings,
                    meta: dict[str, str]) -> tuple[dict[str, Factors], dict]:
    """One standard diffusers LoRA per chunk of rank components (file name -> factors), and the schedule."""
    files, entries, parts = {}, [], family.export_files(list(weights))
    for i, (first, end, t_on) in enumerate(diffusers_scheduled.chunks(settings)):
        chunk = split(select(family, weights, settings, first, end, drop_zero=False), parts)
        names = diffusers_scheduled.file_names(i, list(chunk))
        for name, part in zip(names, chunk.values()):
            files[name] = layout(part, family, "diffusers", meta)
        entries.append(diffusers_scheduled.entry(i, names, first, end, t_on))
    return files, diffusers_scheduled.schedule(settings, entries)


def save_scheduled(family: type[Family], weights: dict[str, torch.Tensor], settings: TLoRASettings,
                   meta: dict[str, str], out: Path) -> None:
    """The chunks and schedule.json, written in a new folder beside `out` and renamed to it when complete (an
    existing `out` is replaced only then)."""
    files, schedule = scheduled_files(family, weights, settings, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out.with_name(f".{out.name}.{secrets.token_hex(4)}.{what}") for what in ("tmp", "old"))
    tmp.mkdir()
    try:
        for name, factors in files.items():
            diffusers_lora.save(factors, family, tmp / name)
        atomic_write(tmp / diffusers_scheduled.SCHEDULE_NAME, json.dumps(schedule, indent=1).encode())
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)  # the export it was to replace, back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def parse_mask(value: str) -> int | None:
    """'full' -> None (every component); 'timestep:T' -> T."""
    if value == "full":
        return None
    if value.startswith("timestep:") and value[len("timestep:"):].isdigit():
        return int(value[len("timestep:"):])
    raise UsageError(f"--mask must be 'full' or 'timestep:T' with T in 0..999, got {value!r}; pass --mask full, or "
                     "--mask timestep:T for the components active at timestep T")


def build_parser() -> Parser:
    p = Parser(description=__doc__.splitlines()[0].strip("`"),
               epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("checkpoint", help="A run folder (its newest checkpoint), a checkpoint-N folder, or its weights file "
                                      "(pytorch_lora_weights.safetensors, or the authors' FLUX lora.pt).")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="diffusers: one LoRA file for the family pipeline's load_lora_weights; kohya: one LoRA file "
                        "with kohya-style keys (SDXL: the original UNet's; FLUX.1 and FLUX.2: BFL's, q, k, v fused) "
                        "for ComfyUI's LoraLoader, A1111/Forge and diffusers; diffusers-scheduled: a folder of LoRA "
                        "chunks and schedule.json for tlora.scheduled (the exact T-LoRA in stock diffusers); authors: "
                        "exactly the authors' file (SDXL: pytorch_lora_weights.safetensors; FLUX.1: lora.pt, which "
                        "their run_inference.py loads).")
    p.add_argument("--out", required=True, help="The file to write (a folder for diffusers-scheduled); an existing one "
                                                "only with --overwrite, and never the checkpoint itself. Wan 2.2 A14B: "
                                                "a file per expert, _high_noise / _low_noise before the extension.")
    p.add_argument("--overwrite", action="store_true", default=False, help="Replace an existing --out.")
    p.add_argument("--mask", default="full", help="diffusers/kohya: 'full' (every component, as at t = 0, default) "
                                                  "or 'timestep:T' (the components active at timestep T).")
    p.add_argument("--rank", type=int, default=None,
                   help="diffusers/kohya: the best rank-K approximation of each layer (prints the relative error).")
    p.add_argument("--config_path", default=None,
                   help="The run's hparams.yml (default: logs/hparams.yml of the run holding the checkpoint, if any).")
    p.add_argument("--trainer_class", default=None, help="Override: whether the timestep mask applies "
                                                         "(<family>_tlora, e.g. sdxl_tlora) or not (<family>_lora).")
    p.add_argument("--min_rank", type=int, default=None, help="Override: the run's min_rank.")
    p.add_argument("--alpha_rank_scale", type=float, default=None, help="Override: the run's alpha_rank_scale.")
    return p


def _check_settings(args: argparse.Namespace) -> None:
    """What the export is built on is known: a timestep mask or schedule never rests on a guessed setting."""
    ckpt: Checkpoint = args.ckpt
    if ckpt.lycoris:
        raise UsageError(f"{ckpt.path} {LYCORIS_REFUSAL}; to export, pass a checkpoint of tlora's or the authors'")
    family = ckpt.settings.family
    if args.format == "authors" and family not in AUTHORS:
        raise UsageError(f"{ckpt.path} is a {family} T-LoRA: no --format authors, the authors released no code for "
                         f"it; use --format diffusers or kohya, or load it with tlora.load(pipe, ...)")
    scheduled = args.format == "diffusers-scheduled" or args.active_at is not None  # built on the mask settings
    guessed = [k for k in BAKED if k in ckpt.assumed] if scheduled and ckpt.settings.timestep_dependent else []
    if guessed:
        what = f"--mask {args.mask}" if args.active_at is not None else f"--format {args.format}"
        raise UsageError(f"{what} is built on {guessed[0]}, which {ckpt.path} does not record; "
                         f"{FIX.format(key=guessed[0])}")
    if args.format == "authors":
        authors = AUTHORS[family]
        if ckpt.settings.trainer_type not in authors.TRAINER_TYPES:
            raise UsageError(f"{ckpt.path} is an {ckpt.settings.trainer_type} T-LoRA: the authors' {family} code has "
                             f"only {' and '.join(authors.TRAINER_TYPES)}; use another --format")
        if Path(args.out).suffix != Path(authors.WEIGHTS_NAME).suffix:
            raise UsageError(f"--out {args.out}: the authors' {family} checkpoints are {authors.WEIGHTS_NAME} files; "
                             f"pass --out .../{authors.WEIGHTS_NAME}")
    if scheduled:  # a full mask, or the authors' file, depends on no setting beyond the tensors
        ckpt.announce(FIX)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.active_at = parse_mask(args.mask)
    if args.active_at is not None and args.active_at > 999:
        raise UsageError(f"--mask timestep:{args.active_at}: T must be in 0..999; pass a T from 0 to 999")
    if args.rank is not None:
        check_count("--rank", args.rank)
    if args.format in ("authors", "diffusers-scheduled") and (args.rank is not None or args.mask != "full"):
        raise UsageError(f"--format {args.format} keeps the T-LoRA whole: drop --mask and --rank")
    args.ckpt = read(args.checkpoint, args.config_path, quiet=True, trainer_class=args.trainer_class,
                     min_rank=args.min_rank, alpha_rank_scale=args.alpha_rank_scale)
    _check_out(args)
    _check_settings(args)
    args.ckpt.tensors()  # read and checked (finite) now, kept for the export
    return args


def _check_out(args: argparse.Namespace) -> None:
    """Never write over the checkpoint being exported; over another existing path only with --overwrite; only where
    a file can be written."""
    try:
        _check_out_path(args)
    except OSError as err:  # a name too long for the system, a loop of links
        raise UsageError(f"--out: cannot use {shown(args.out)} ({err.strerror}); pass another path") from None


def _check_out_path(args: argparse.Namespace) -> None:
    out, source = Path(args.out).absolute(), args.ckpt.path.absolute()
    if out.resolve() == source.resolve() or (out.is_dir() and source.resolve().is_relative_to(out.resolve())):
        raise UsageError(f"--out {args.out} is (or holds) the checkpoint being exported; pass another path")
    family = args.ckpt.family
    files = family.export_files(list(args.ckpt.shapes)) if family and args.format in ("diffusers", "kohya") else {}
    for path in [file_name(out, suffix) for suffix in files] or [out]:
        if path.exists() and (path.is_dir() != (args.format == "diffusers-scheduled")):
            raise UsageError(f"--out: {path} exists and is a {'folder' if path.is_dir() else 'file'}; pass a new path")
        if path.exists() and not args.overwrite:
            raise UsageError(f"--out: {path if len(files) > 1 else args.out} exists; {NEW_PATH}")
    check_writable(out.parent, f"--out {args.out}", "pass a path in a folder you can write to")


@contextmanager
def written(out: Path):
    """A failed write of --out (a full disk, a folder made read-only meanwhile) as one line; the writers remove
    what they had written."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:
        if not is_write_failure(err):
            raise
        raise RunFailed(f"--out {out}: {write_failure(err, out.parent)}; free some space or pass another "
                        "--out, and export again (nothing was written)") from None


def save_authors(ckpt: Checkpoint, weights: dict[str, torch.Tensor], out: Path) -> None:
    """The authors' file: every key their loader expects (formats.authors_<family>.weights), as safetensors with
    `format: pt` as the only metadata, or (a .pt file) a plain torch.save of tensors."""
    family, authors = ckpt.settings.family, AUTHORS[ckpt.settings.family]
    tensors = flatten(authors.weights(group(weights), *PARAMS["lora"]))
    if out.suffix == ".pt":
        save_pickle(tensors, out)
    else:
        atomic_write(out, save(tensors, metadata={"format": "pt"}))
    if not authors.HAS_ALPHA and ckpt.settings.timestep_dependent and ckpt.settings.alpha_rank_scale != 1:
        note(f"the authors' {family} code has no alpha: their inference masks with alpha 1, not "
             f"{ckpt.settings.alpha_rank_scale}")


def export(args: argparse.Namespace) -> Path | str:
    """The path written (several files: their paths, joined)."""
    ckpt: Checkpoint = args.ckpt
    out = Path(args.out)
    write = fixed_mask_export(args) if args.format in ("diffusers", "kohya") else None
    with written(out):
        if args.format == "authors":
            save_authors(ckpt, ckpt.tensors(), out)
        elif args.format == "diffusers-scheduled":
            save_scheduled(ckpt.family, ckpt.tensors(), ckpt.settings, ckpt.metadata, out)
        else:
            paths = write(out)
            return out if paths == [out] else " and ".join(map(str, paths))
    return out


def fixed_mask_export(args: argparse.Namespace):
    """Compute a diffusers or kohya export (nothing written yet); returns the function that writes it."""
    ckpt: Checkpoint = args.ckpt
    weights, s = ckpt.tensors(), ckpt.settings
    active = None if args.active_at is None else s.active_rank(args.active_at)
    factors = fixed_mask_factors(ckpt.family, weights, s, active)
    if not factors:
        raise UsageError(f"{ckpt.path}: the update is zero under this mask (an untrained lora?), so there is nothing "
                         "to export; export a trained checkpoint, or pass another --mask")
    parts = ckpt.family.export_files(list(weights))
    files = {suffix: layout(part, ckpt.family, args.format, ckpt.metadata)
             for suffix, part in split(factors, parts).items()}
    for suffix in [suffix for suffix, part in files.items() if not part]:  # one expert never trained, say
        note(f"{ckpt.path}: the update of {parts[suffix].rstrip('.')}'s layers is zero under this mask (never "
             f"trained?), so no {suffix.strip('_')} file is written")
        del files[suffix]
    if args.rank is not None:
        errors = []
        for suffix, part in files.items():
            files[suffix], part_errors = truncate(part, args.rank)
            errors += part_errors
        print(f"rank {args.rank}: relative error per layer: mean {sum(errors) / len(errors):.4g}, max {max(errors):.4g}")
    if args.format == "diffusers":
        return lambda out: write_files(files, out, lambda part, path: diffusers_lora.save(part, ckpt.family, path))
    meta = kohya.metadata(ckpt.family)
    tensors = {suffix: kohya.tensors(part) for suffix, part in files.items()}
    return lambda out: write_files(tensors, out, lambda part, path: atomic_write(path, save(part, metadata=meta)))


def write_files(files: dict[str, Any], out: Path, write: Callable[[Any, Path], None]) -> list[Path]:
    """Each file at `out` with its suffix (file_name); those written are removed again when a later one fails."""
    done: list[Path] = []
    try:
        for suffix, part in files.items():
            write(part, file_name(out, suffix))
            done.append(file_name(out, suffix))
    except BaseException:
        for path in done:
            path.unlink(missing_ok=True)
        raise
    return done


def main(argv: list[str] | None = None) -> int:
    return run_command(parse_args, export, "written", argv)


if __name__ == "__main__":
    sys.exit(main())
