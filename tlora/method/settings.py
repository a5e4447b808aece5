"""`TLoRASettings`: every setting a T-LoRA's output depends on beyond its tensors, in one type.

Like peft's `LoraConfig` for a LoRA: one dataclass, checked by `validate()`, converted to and from every
place settings are kept, and the one in-memory form of the rank schedule and mask (`active_rank(t)`, `mask(t)`):

- our checkpoint metadata and a diffusers-scheduled export's schedule.json: trainer_type, trainer_class,
  lora_rank, min_rank, alpha_rank_scale, sig_type, family (and ComfyUI-T-LoRA's names max_rank, alpha);
- our hparams.yml: the same keys, and on FLUX also the authors' FLUX keys `tlora` and `rank`;
- the authors' SDXL hparams.yml: trainer_type, trainer_class, lora_rank, min_rank, alpha_rank_scale, sig_type;
- the authors' FLUX hparams.yml: tlora (mask or not), rank, min_rank; their code has no alpha (1) and only
  Vanilla T-LoRA;
- SimpleTuner / LyCORIS lycoris_config: algo tlora, linear_dim, tlora_min_rank (default 1), tlora_alpha (default 1).

Partial sources (a file's metadata, a hparams.yml) give a `dict` of the fields they know (`known_from_*`);
`tlora.runs.reading` merges them in order and records where each setting came from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from tlora.common.errors import UsageError
from tlora.common.messages import OWN_FAMILY, PASS_HPARAMS
from tlora.common.values import check_count, shown, typed_value
from tlora.families import FAMILIES
from tlora.method import adapters
from tlora.method.adapters import DEFAULT_RULE, RANK_RULES, SIG_TYPES, TRAINER_TYPES

TRAINER_CLASSES = tuple(f"{family}_{kind}" for family in FAMILIES for kind in ("lora", "tlora"))
RESULT_FIELDS = ("family", "trainer_type", "timestep_dependent", "lora_rank", "min_rank", "alpha_rank_scale")


@dataclass(frozen=True)
class TLoRASettings:
    """The settings of one T-LoRA.

    trainer_type:        "lora" (Vanilla T-LoRA: B M_t A) or "ortho_lora" (T-LoRA: P L M_t Q - P0 L0 M_t Q0).
    lora_rank:           r, the adapters' rank (per layer min(r, in, out)).
    min_rank:            r_min, the rank active at t = T.
    alpha_rank_scale:    alpha in r(t) = int(((T - t) / T) ** alpha * (r - r_min)) + r_min.
    timestep_dependent:  whether the rank mask applies (trainer_class <family>_tlora) or not (<family>_lora).
    family:              the model family ("sdxl", "flux", "klein"); None until known (attach fills it in).
    sig_type:            which SVD components start an ortho_lora ("last", "principal", "middle"); training only.
    num_train_timesteps: T (the model's training timesteps).
    rank_rule:           how r(t) is rounded (adapters.RANK_RULES); None: the family's authors' rule.
    """

    trainer_type: str
    lora_rank: int
    min_rank: int = 1
    alpha_rank_scale: float = 1.0
    timestep_dependent: bool = True
    family: str | None = None
    sig_type: str = "last"
    num_train_timesteps: int = 1000
    rank_rule: str | None = None

    @property
    def trainer_class(self) -> str:
        """The authors' name for family and mask: sdxl_tlora, sdxl_lora, flux_tlora, flux_lora."""
        kind = "tlora" if self.timestep_dependent else "lora"
        return f"{self.family}_{kind}" if self.family else kind

    @property
    def rule(self) -> str:
        """The rounding rule of r(t): rank_rule, else the family's (its authors' code)."""
        return self.rank_rule or (FAMILIES[self.family].rank_rule if self.family else DEFAULT_RULE)

    def active_rank(self, t: torch.Tensor | float) -> torch.Tensor | int:
        """r(t), how many rank components the mask keeps at timestep t, rounded as `rule` rounds it; lora_rank at
        every t without the mask. Timesteps as a tensor give an int64 tensor of their shape, a number an int."""
        if self.timestep_dependent:
            ranks = adapters.active_rank(t, self.num_train_timesteps, self.lora_rank, self.min_rank,
                                         self.alpha_rank_scale, self.rule)
        else:
            steps = torch.as_tensor(t)
            ranks = torch.full(steps.shape, self.lora_rank, dtype=torch.int64, device=steps.device)
        return ranks if torch.is_tensor(t) else int(ranks)

    def mask(self, t: torch.Tensor | float) -> torch.Tensor:
        """The 0/1 float32 mask at timestep t, of shape t.shape + (lora_rank,): the first active_rank(t) components."""
        return adapters.mask_of(self.active_rank(torch.as_tensor(t)), self.lora_rank)

    def validate(self, flags: bool = False) -> TLoRASettings:
        """Fail with one line naming the first setting that makes no sense (as `--flag` when `flags`)."""
        name = (lambda key: f"--{key}") if flags else (lambda key: key)
        for key, allowed in (("trainer_type", TRAINER_TYPES), ("sig_type", SIG_TYPES),
                             ("family", tuple(FAMILIES) + (None,)), ("rank_rule", tuple(RANK_RULES) + (None,))):
            if getattr(self, key) not in allowed:
                raise UsageError(f"{name(key)} must be one of {', '.join(map(str, allowed))}, got "
                                 f"{getattr(self, key)!r}; pass one of them")
        for key in ("lora_rank", "min_rank", "num_train_timesteps"):
            check_count(name(key), getattr(self, key))
        if self.min_rank > self.lora_rank:
            raise UsageError(f"{name('min_rank')} ({self.min_rank}) must not exceed {name('lora_rank')} "
                             f"({self.lora_rank}); pass a {name('min_rank')} of at most {self.lora_rank}")
        alpha = self.alpha_rank_scale
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
            raise UsageError(f"{name('alpha_rank_scale')} must be a finite number > 0, got {alpha!r}; pass e.g. 1.0 "
                             "(the paper's)")
        return self

    def for_family(self, family: str) -> TLoRASettings:
        """These settings on a model of `family` (filled in when unknown; refused when another)."""
        if self.family not in (None, family):
            raise UsageError(f"trainer_class {self.trainer_class}: this T-LoRA was trained on {self.family}; "
                             f"this is a {family} model: {OWN_FAMILY}")
        return replace(self, family=family)

    # -- our files -------------------------------------------------------------------------------
    def to_metadata(self) -> dict[str, str]:
        """Our checkpoints' metadata (strings), with ComfyUI-T-LoRA's field names (max_rank, alpha) as well."""
        values = self.to_hparams(authors_keys=False) | {"max_rank": self.lora_rank, "alpha": self.alpha_rank_scale}
        return {k: str(v) for k, v in values.items()}

    def to_hparams(self, authors_keys: bool = True) -> dict[str, Any]:
        """Our hparams.yml keys; on FLUX also the keys the authors' FLUX run_inference.py reads (tlora, rank)."""
        values = {"trainer_type": self.trainer_type, "trainer_class": self.trainer_class, "lora_rank": self.lora_rank,
                  "min_rank": self.min_rank, "alpha_rank_scale": self.alpha_rank_scale, "sig_type": self.sig_type,
                  "family": self.family}
        if authors_keys and self.family:
            values |= FAMILIES[self.family].authors_run_keys(self)
        return values

    @classmethod
    def from_hparams(cls, values: dict[str, Any], where: str = "hparams.yml", flags: bool = False) -> TLoRASettings:
        """Settings from a complete hparams.yml (ours, the authors' SDXL or FLUX) or train.py's options (`flags`:
        errors name them as --flags)."""
        known = known_from_hparams(values, where)
        missing = [k for k in ("trainer_type", "lora_rank") if k not in known]
        if missing:
            raise UsageError(f"{where} has no {missing[0]}; {PASS_HPARAMS}")
        return cls.from_known(known, flags)

    @classmethod
    def from_known(cls, known: dict[str, Any], flags: bool = False) -> TLoRASettings:
        """Settings from a complete dict of fields (as merged by tlora.runs.reading), checked."""
        return cls(**{f.name: known[f.name] for f in fields(cls) if f.name in known}).validate(flags)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"trainer_class": self.trainer_class}


# -- partial sources: each gives the fields it knows ------------------------------------------------
def split_trainer_class(where: str, value: Any) -> dict[str, Any]:
    """'flux_tlora' -> family flux, timestep_dependent True."""
    if value not in TRAINER_CLASSES:
        raise UsageError(f"{where}: trainer_class must be one of {', '.join(TRAINER_CLASSES)}, got {value!r}; pass one "
                         "of them")
    family, kind = str(value).split("_", 1)
    return {"family": family, "timestep_dependent": kind == "tlora"}


OUR_KEYS = {"trainer_type": str, "lora_rank": int, "min_rank": int, "alpha_rank_scale": float, "sig_type": str,
            "family": str}


def known_from_ours(values: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields our keys give (a hparams.yml, a checkpoint's metadata, a schedule.json; also the authors' SDXL
    hparams.yml): trainer_class is split into family and mask."""
    known = {k: typed_value(where, k, values[k], kind) for k, kind in OUR_KEYS.items() if values.get(k) is not None}
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
    for family in FAMILIES.values():
        if family.authors_hparams(values, "") is not None:
            return f"authors-{family.name}"
    return "authors-sdxl" if "trainer_class" in values else "partial"


def known_from_hparams(values: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields a hparams.yml gives, in the key set of the tool that wrote it."""
    if "trainer_class" not in values:
        for family in FAMILIES.values():
            known = family.authors_hparams(values, where)
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


def known_from_lycoris(config: dict[str, Any], rank: int, where: str) -> dict[str, Any]:
    """SimpleTuner's mask settings from a lycoris_config, with LyCORIS's defaults (as SimpleTuner reads them)."""
    if config.get("algo", "tlora") != "tlora":
        raise UsageError(f"{where} holds LyCORIS algo {config.get('algo')!r}, not a T-LoRA (algo tlora); pass a "
                         "LyCORIS file with algo tlora")
    return {"trainer_type": "ortho_lora", "timestep_dependent": True, "rank_rule": "float64",
            "lora_rank": typed_value(where, "linear_dim", config.get("linear_dim") or rank, int),
            "min_rank": typed_value(where, "tlora_min_rank", config.get("tlora_min_rank", 1), int),
            "alpha_rank_scale": typed_value(where, "tlora_alpha", config.get("tlora_alpha", 1.0), float)}
