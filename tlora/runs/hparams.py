"""The settings as hparams.yml files and our checkpoints' metadata keep them: ours (the authors' SDXL keys plus
`family`), the authors' FLUX keys (`tlora`, `rank`), keyword overrides; and `trainer_class` names, which say a
family. A partial source (a file's metadata, a hparams.yml) gives a `dict` of the fields it knows
(`known_from_*`); tlora.runs.reading merges them in order and records where each setting came from.

- our checkpoint metadata and a diffusers-scheduled export's schedule.json: trainer_type, trainer_class,
  lora_rank, min_rank, alpha_rank_scale, sig_type, family (and ComfyUI-T-LoRA's names max_rank, alpha);
- our hparams.yml: the same keys, and on FLUX also the authors' FLUX keys `tlora` and `rank`;
- the authors' SDXL hparams.yml: trainer_type, trainer_class, lora_rank, min_rank, alpha_rank_scale, sig_type;
- the authors' FLUX hparams.yml: tlora (mask or not), rank, min_rank; their code has no alpha (1) and only
  Vanilla T-LoRA.
"""

from __future__ import annotations

from typing import Any

from tlora.common.errors import UsageError
from tlora.common.messages import PASS_HPARAMS
from tlora.common.values import shown, typed_value
from tlora.families import FAMILIES
from tlora.formats import AUTHORS
from tlora.method.settings import TLoRASettings

TRAINER_CLASSES = tuple(f"{family}_{kind}" for family in FAMILIES for kind in ("lora", "tlora"))


def to_hparams(settings: TLoRASettings) -> dict[str, Any]:
    """Our hparams.yml keys; on FLUX also the keys the authors' FLUX run_inference.py reads (tlora, rank)."""
    values = settings.our_keys()
    if settings.family:
        values |= AUTHORS[settings.family].run_keys(settings) if settings.family in AUTHORS else {}
    return values


def from_hparams(values: dict[str, Any], where: str = "hparams.yml", flags: bool = False) -> TLoRASettings:
    """Settings from a complete hparams.yml (ours, the authors' SDXL or FLUX) or train.py's options (`flags`:
    errors name them as --flags)."""
    known = known_from_hparams(values, where)
    missing = [k for k in ("trainer_type", "lora_rank") if k not in known]
    if missing:
        raise UsageError(f"{where} has no {missing[0]}; {PASS_HPARAMS}")
    return settings_from_known(known, flags)


def settings_from_known(known: dict[str, Any], flags: bool = False) -> TLoRASettings:
    """Settings from a complete dict of fields, checked; a known family brings its rank rule unless one is given."""
    settings = TLoRASettings.from_known(known, flags)
    return settings.for_family(settings.family, FAMILIES[settings.family].rank_rule) if settings.family else settings


def split_trainer_class(where: str, value: Any) -> dict[str, Any]:
    """'flux_tlora' -> family flux, timestep_dependent True."""
    if value not in TRAINER_CLASSES:
        raise UsageError(f"{where}: trainer_class must be one of {', '.join(TRAINER_CLASSES)}, got {value!r}; pass one "
                         "of them")
    family, kind = str(value).rsplit("_", 1)
    return {"family": family, "timestep_dependent": kind == "tlora"}


OUR_KEYS = {"trainer_type": str, "lora_rank": int, "min_rank": int, "alpha_rank_scale": float, "sig_type": str,
            "family": str}


def known_from_ours(values: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields our keys give (a hparams.yml, a checkpoint's metadata, a schedule.json; also the authors' SDXL
    hparams.yml): trainer_class is split into family and mask."""
    known = {k: typed_value(where, k, values[k], kind) for k, kind in OUR_KEYS.items() if values.get(k) is not None}
    if known.get("family", next(iter(FAMILIES))) not in FAMILIES:
        raise UsageError(f"{where}: family must be one of {', '.join(FAMILIES)}, got {shown(known['family'])}; "
                         "pass one of them")
    if values.get("trainer_class") is not None:
        split = split_trainer_class(where, values["trainer_class"])
        if known.get("family", split["family"]) != split["family"]:
            raise UsageError(f"{where}: trainer_class {values['trainer_class']} does not match family "
                             f"{known['family']}; fix one of them")
        known |= split
    return known


def hparams_kind(values: dict[str, Any]) -> str:
    """Which tool wrote a hparams.yml: 'tlora' (ours, with family), 'authors-<family>' (the key set of that
    family's authors' code; their SDXL keys are ours without `family`), or 'partial' (a dict of some settings)."""
    if "family" in values and "trainer_class" in values:
        return "tlora"
    for family, authors in AUTHORS.items():
        if authors.hparams(values, "") is not None:
            return f"authors-{family}"
    return "authors-sdxl" if "trainer_class" in values else "partial"


def known_from_hparams(values: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields a hparams.yml gives, in the key set of the tool that wrote it."""
    if "trainer_class" not in values:
        for authors in AUTHORS.values():
            known = authors.hparams(values, where)
            if known is not None:
                return known
    return known_from_ours(values, where)


def known_from_overrides(overrides: dict[str, Any], where: str = "tlora.load") -> dict[str, Any]:
    """Keyword settings (tlora.load(..., min_rank=2), export flags); None means not given."""
    allowed = set(OUR_KEYS) | {"trainer_class", "timestep_dependent"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise UsageError(f"{where}: unknown setting {shown(unknown[0])}; pass one of {', '.join(sorted(allowed))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    known = known_from_ours(given, where)
    if "timestep_dependent" in given:
        known["timestep_dependent"] = typed_value(where, "timestep_dependent", given["timestep_dependent"], bool)
    return known
