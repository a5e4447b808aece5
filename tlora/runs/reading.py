"""Reading a T-LoRA: the one place that finds a checkpoint's weights, reads them and works out its settings.

    ckpt = tlora.read("RUN/checkpoint-800")   # a run folder, a checkpoint folder, a .safetensors or lora.pt file
    ckpt.settings                             # a TLoRASettings
    ckpt.sources                              # where each setting came from
    ckpt.tensors()                            # the adapters' tensors

Settings, the first source that has one wins:
 1. what the caller sets: tlora.load / tlora.read keywords, export's flags;
 2. the file's metadata (our files carry every setting);
 3. the run's hparams.yml: the one passed, else `logs/hparams.yml` of the run that holds the checkpoint
    (our keys, the authors' SDXL keys, or the authors' FLUX keys `tlora`, `rank`, `min_rank`);
 4. what the tensors show: trainer type, rank and model family;
 5. the authors' defaults: sdxl_tlora on SDXL, flux_lora (no mask) on FLUX, min_rank 1, alpha 1, each said
    in one line (an `AssumedSetting` warning) when it changes the result.
A file's metadata and a hparams.yml that disagree are an error, and so are settings that the tensors
contradict. SimpleTuner / LyCORIS files carry their settings in `lycoris_config` and are read as
SimpleTuner reads them. A `lora.pt` is read with torch.load(weights_only=True): tensors only, never code.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from tlora import families
from tlora.common.errors import CheckpointError
from tlora.common.messages import OWN_FAMILY, AssumedSetting
from tlora.common.text_files import parse_json
from tlora.common.values import shown
from tlora.families import FAMILIES, Family
from tlora.formats import AUTHORS, lycoris
from tlora.method.settings import RESULT_FIELDS, TLoRASettings
from tlora.runs import keys
from tlora.runs.hparams import (
    hparams_kind,
    known_from_hparams,
    known_from_ours,
    known_from_overrides,
    settings_from_known,
)
from tlora.runs.run_folder import RunFolder, find_weights, read_hparams
from tlora.runs.weights import DAMAGED, check_finite_tensors, read_header, read_tensors

DEFAULT = "default"
TENSORS = "the tensors"
GIVEN = "given"
METADATA = "the file's metadata"
LYCORIS_CONFIG = "the file's lycoris_config"
FIX = "pass {key}=... to tlora.load (or the run's hparams.yml)"


@dataclass
class Checkpoint:
    """A T-LoRA on disk: its weights file, settings and where each came from; tensors are read on demand."""

    path: Path
    family: type[Family] | None  # the family it is for, resolved once here and carried (settings.family is its name)
    settings: TLoRASettings
    sources: dict[str, str]
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    hparams: dict[str, Any] = field(default_factory=dict)
    hparams_path: Path | None = None
    lycoris: bool = False
    assumed: dict[str, str] = field(default_factory=dict)  # setting -> the line that says what was assumed
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapters' tensors (without the keys the authors write but never use), checked to be finite; read
        once, then kept (they are small)."""
        if self._tensors is None:
            tensors = {k: v for k, v in read_tensors(self.path).items() if k in self.shapes}
            check_finite_tensors(tensors, self.path)
            self._tensors = tensors
        return dict(self._tensors)

    def announce(self, fix: str = FIX) -> None:
        """Say, one line each, which settings that change the result were assumed (AssumedSetting warnings,
        attributed to the caller's code outside tlora)."""
        for key, line in self.assumed.items():
            warnings.warn(f"{line}; {fix.format(key=key)}", AssumedSetting, stacklevel=_outside_tlora())

    def describe(self) -> str:
        """One line per setting: value and source (the mask as the authors' trainer_class)."""
        values = self.settings.as_dict()
        name = lambda key: "trainer_class" if key == "timestep_dependent" else key
        return "\n".join(f"{name(k)}: {values[name(k)]} ({source})" for k, source in self.sources.items())


def _outside_tlora() -> int:
    """The stacklevel of the first frame outside the tlora package (as seen from warnings.warn's caller)."""
    package = str(Path(__file__).parent)
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


# -- what the tensors show --------------------------------------------------------------------------
LYCORIS_REFUSAL = ("is a LyCORIS (SimpleTuner) T-LoRA file: load it with tlora.load(pipe, file) (LyCORIS rebuilds "
                   "its frozen start from the base model's weights)")


def check_shapes(shapes: dict, where: Path) -> None:
    """Every key one of ours (runs.keys) and every adapter weight a matrix with no empty side (the readers below
    rely on it)."""
    stray = keys.not_ours(shapes)
    if stray:
        raise CheckpointError(f"{where}: tensor {shown(stray[0])} is no T-LoRA adapter's parameter, so this is not a "
                              "T-LoRA checkpoint; pass a T-LoRA checkpoint")
    check_matrices(keys.matrices(shapes), where)


def check_matrices(shapes: dict[str, tuple[int, ...]], where: Path) -> None:
    for key, shape in shapes.items():
        if len(shape) != 2 or 0 in shape:
            raise CheckpointError(f"{where}: tensor {shown(key)} has shape {tuple(shape)}, not a matrix, so this is "
                                  f"not a T-LoRA checkpoint; {DAMAGED}")


def check_made_with(shapes: dict, trainer_type: str, lora_rank: int, where: str = "checkpoint") -> None:
    """Fail in one line when a checkpoint was not made with `trainer_type` and `lora_rank`."""
    found_type, found_rank = keys.infer_trainer_type(shapes, where), keys.infer_rank(shapes)
    if found_type != trainer_type or any(r != min(lora_rank, i, o) for r, i, o in keys.layer_ranks(shapes).values()):
        raise CheckpointError(
            f"{where}: this is a {found_type} checkpoint, rank {found_rank}, but the settings say "
            f"trainer_type {trainer_type}, lora_rank {lora_rank}; use the hparams.yml of the run that wrote it"
        )


def file_families(shapes: dict, where: Path) -> list[str]:
    """The families the keys fit, the likeliest first (see families.of_keys)."""
    names = families.of_keys(shapes)
    if not names:
        raise CheckpointError(f"{where}: its keys name no layer of a {' or '.join(families.FAMILIES)} model; "
                              "pass a T-LoRA checkpoint")
    return names


# -- settings ---------------------------------------------------------------------------------------
def _merge(layers: list[tuple[str, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, str]]:
    """First source wins; metadata and a hparams.yml (the two records) must agree on what changes the result,
    unless the caller sets it."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    records = [(label, known) for label, known in layers if label not in (GIVEN, TENSORS)]
    given = dict(layers).get(GIVEN, {})
    for key in (k for k in RESULT_FIELDS if k not in given):
        said = {label: known[key] for label, known in records if key in known}
        if len(set(map(str, said.values()))) > 1:
            (a, x), (b, y) = list(said.items())[:2]
            raise CheckpointError(f"{key}: {a} says {x!r} but {b} says {y!r}; pass {key}=... (or the right "
                                  "hparams.yml) to choose")
    for label, known in layers:
        for key, value in known.items():
            if key not in merged:
                merged[key], sources[key] = value, label
    return merged, sources


SETTING_DEFAULTS = {f.name: f.default for f in fields(TLoRASettings) if f.default is not MISSING}
DEFAULTED = ("min_rank", "alpha_rank_scale", "sig_type", "num_train_timesteps")  # after timestep_dependent: the family's


def _defaults(family: type[Family], merged: dict[str, Any], sources: dict[str, str], where: Path) -> dict[str, str]:
    """Fill what no source gave with the `family` authors' defaults; returns the lines for those that change the
    result."""
    defaults = {"timestep_dependent": family.masked_by_default} | {k: SETTING_DEFAULTS[k] for k in DEFAULTED}
    assumed = {}
    for key, value in defaults.items():
        if key in merged:
            continue
        merged[key], sources[key] = value, DEFAULT
        if key == "timestep_dependent":
            assumed["trainer_class"] = (f"{where}: nothing records whether the timestep mask applies; assuming "
                                        f"trainer_class {merged['family']}_{'tlora' if value else 'lora'} "
                                        f"({family.masked_by_default_why})")
        elif key in ("min_rank", "alpha_rank_scale") and merged["timestep_dependent"]:
            assumed[key] = f"{where}: nothing records {key}; assuming {value} (the authors' default)"
    return assumed


def _hparams(given: dict | str | Path | None, weights: Path) -> tuple[dict, str | None, Path | None]:
    """(values, source label, path) of the run's hparams.yml: the one given, else the one beside the run."""
    if isinstance(given, dict):
        return dict(given), "the hparams given", None
    run = RunFolder.holding(weights.parent)
    path = Path(given) if given is not None else (run.hparams_path if run else None)
    if path is None:
        return {}, None, None
    values = read_hparams(path)
    kind = hparams_kind(values)
    label = str(path) + (f" (the authors' {kind[8:].upper()} keys)" if kind.startswith("authors-") and kind != "authors-sdxl"
                         else "")
    return values, label, path


def read(
    path: str | Path,
    hparams: dict | str | Path | None = None,
    *,
    family: str | None = None,
    num_train_timesteps: int | None = None,
    fix: str = FIX,
    quiet: bool = False,
    **overrides: Any,
) -> Checkpoint:
    """Find, read and check a T-LoRA checkpoint; see the module docstring for where its settings come from.

    `family` is the model's it will be loaded on (refused when the file's is another); `num_train_timesteps`
    the model scheduler's; `overrides` are settings (trainer_class, min_rank, ...) that win over every record.
    Unless `quiet`, assumed settings are said through `AssumedSetting` warnings, each ending with `fix`.
    """
    given = known_from_overrides(overrides)
    weights = find_weights(path)
    shapes, metadata = read_header(weights)
    if lycoris.is_lycoris(shapes):
        return _read_lycoris(weights, shapes, metadata, family, num_train_timesteps, given)
    candidates = file_families(shapes, weights)
    sure = families.known_from_keys(shapes)  # None: FLUX.1's and FLUX.2's double blocks are named alike
    if family is not None and (family not in candidates or sure not in (None, family)):
        raise CheckpointError(f"{weights} was trained on {sure or candidates[0]}; this is a {family} model: "
                              f"{OWN_FAMILY}")
    fam = family or candidates[0]
    shapes = keys.without_adapters(shapes, AUTHORS[fam].unused if fam in AUTHORS else lambda prefix: False)
    check_shapes(shapes, weights)
    values, label, hparams_path = _hparams(hparams, weights)
    layers = [(GIVEN, given), (METADATA, known_from_ours(metadata, str(weights)))]
    if label is not None:
        layers.append((label, known_from_hparams(values, label)))
    from_keys = {"family": sure} if sure else {}
    found = {"trainer_type": keys.infer_trainer_type(shapes, str(weights)), "lora_rank": keys.infer_rank(shapes)}
    layers.append((TENSORS, from_keys | found))
    if weights.suffix == ".pt":  # only the authors' FLUX code writes lora.pt files, and it has no alpha
        layers.append(("the authors' FLUX code (no alpha)", {"alpha_rank_scale": 1.0}))
    if num_train_timesteps is not None:
        layers.append(("the model's scheduler", {"num_train_timesteps": num_train_timesteps}))
    merged, sources = _merge(layers)
    if merged.get("family", fam) not in candidates:
        raise CheckpointError(f"{weights}: {sources['family']} says family {merged['family']}, but its keys are "
                              f"{candidates[0]}'s; {FIX.format(key='family')}")
    assumed = {}
    if "family" not in merged:
        merged["family"], sources["family"] = fam, DEFAULT
        fit = " and ".join([", ".join(candidates[:-1]), candidates[-1]] if len(candidates) > 1 else candidates)
        assumed["family"] = (f"{weights}: its keys fit {fit} models and nothing records which; "
                             f"assuming {fam}")
    recipe = FAMILIES[merged["family"]]
    assumed |= _defaults(recipe, merged, sources, weights)
    settings = settings_from_known(merged)
    check_made_with(shapes, settings.trainer_type, settings.lora_rank, where=str(weights))
    ckpt = Checkpoint(weights, recipe, settings, sources, metadata, shapes, values, hparams_path, assumed=assumed)
    if not quiet:
        ckpt.announce(fix)
    return ckpt


def _read_lycoris(weights: Path, shapes: dict, metadata: dict[str, str], family: str | None,
                  num_train_timesteps: int | None, given: dict[str, Any]) -> Checkpoint:
    """A SimpleTuner / LyCORIS T-LoRA: settings given, else from its lycoris_config with SimpleTuner's defaults."""
    fix = f"{lycoris.RESAVE} (its lycoris_config is a JSON mapping of settings)"
    try:
        config = parse_json(metadata.get("lycoris_config") or "{}")
    except ValueError:
        raise CheckpointError(f"{weights}: its lycoris_config metadata is not JSON; {fix}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{weights}: its lycoris_config metadata is {shown(config)}, not a mapping of settings; "
                              f"{fix}")
    check_matrices(lycoris.lycoris_matrices(shapes), weights)
    known = lycoris.known_from_lycoris(config, lycoris.lycoris_rank(shapes), str(weights))
    known["family"] = family or families.known_from_keys(shapes)  # None: its keys fit several (tlora.load says)
    known["num_train_timesteps"] = num_train_timesteps or SETTING_DEFAULTS["num_train_timesteps"]
    sources = {k: LYCORIS_CONFIG for k in known} | {"family": GIVEN if family else TENSORS if known["family"] else
                                                    "not known: its keys fit several families"}
    sources |= dict.fromkeys(given, GIVEN)
    settings = settings_from_known(known | given)
    return Checkpoint(weights, FAMILIES.get(settings.family), settings, sources, metadata, shapes,
                      lycoris=True)
