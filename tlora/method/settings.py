"""`TLoRASettings`: every setting a T-LoRA's output depends on beyond its tensors, in one type.

Like peft's `LoraConfig` for a LoRA: one dataclass, checked by `validate()`, and the one in-memory form of the
rank schedule and mask (`active_rank(t)`, `mask(t)`). The family is a name here: the family that owns the model
fills it in with its rank rule (`for_family`). Where settings are kept (our metadata and hparams.yml, the
authors' files, LyCORIS configs) is tlora.runs.hparams' and tlora.formats' business.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from tlora.common.errors import UsageError
from tlora.common.messages import OWN_FAMILY
from tlora.common.values import check_count
from tlora.method import adapters
from tlora.method.adapters import DEFAULT_RULE, RANK_RULES, SIG_TYPES, TRAINER_TYPES

RESULT_FIELDS = ("family", "trainer_type", "timestep_dependent", "lora_rank", "min_rank", "alpha_rank_scale")


@dataclass(frozen=True)
class TLoRASettings:
    """The settings of one T-LoRA.

    trainer_type:        "lora" (Vanilla T-LoRA: B M_t A) or "ortho_lora" (T-LoRA: P L M_t Q - P0 L0 M_t Q0).
    lora_rank:           r, the adapters' rank (per layer min(r, in, out)).
    min_rank:            r_min, the rank active at t = T.
    alpha_rank_scale:    alpha in r(t) = int(((T - t) / T) ** alpha * (r - r_min)) + r_min.
    timestep_dependent:  whether the rank mask applies (trainer_class <family>_tlora) or not (<family>_lora).
    family:              the model family's name ("sdxl", "flux", ...); None until known (attach fills it in).
    sig_type:            which SVD components start an ortho_lora ("last", "principal", "middle"); training only.
    num_train_timesteps: T (the model's training timesteps).
    rank_rule:           how r(t) is rounded (adapters.RANK_RULES); None until the family is known (its rule).
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
        """The rounding rule of r(t): rank_rule; with no family, the default. Settings that name a family but no
        rule were not made by that family (`for_family`): never guessed, since the rules differ by one component
        at some t."""
        if self.rank_rule is None and self.family is not None:
            raise ValueError(f"settings of family {self.family} without its rank_rule: make them with "
                             "for_family(name, rank_rule)")
        return self.rank_rule or DEFAULT_RULE

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
                             ("rank_rule", tuple(RANK_RULES) + (None,))):
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

    def for_family(self, family: str, rank_rule: str) -> TLoRASettings:
        """These settings on a model of `family`, whose T-LoRAs round r(t) by `rank_rule` unless these settings
        say another rule (filled in when unknown; refused when another family)."""
        if self.family not in (None, family):
            raise UsageError(f"trainer_class {self.trainer_class}: this T-LoRA was trained on {self.family}; "
                             f"this is a {family} model: {OWN_FAMILY}")
        return replace(self, family=family, rank_rule=self.rank_rule or rank_rule)

    # -- our files -------------------------------------------------------------------------------
    def to_metadata(self) -> dict[str, str]:
        """Our checkpoints' metadata (strings), with ComfyUI-T-LoRA's field names (max_rank, alpha) as well."""
        values = self.our_keys() | {"max_rank": self.lora_rank, "alpha": self.alpha_rank_scale}
        return {k: str(v) for k, v in values.items()}

    def our_keys(self) -> dict[str, Any]:
        """The keys of our hparams.yml and metadata (the authors' SDXL keys, and `family`)."""
        return {"trainer_type": self.trainer_type, "trainer_class": self.trainer_class, "lora_rank": self.lora_rank,
                "min_rank": self.min_rank, "alpha_rank_scale": self.alpha_rank_scale, "sig_type": self.sig_type,
                "family": self.family}

    @classmethod
    def from_known(cls, known: dict[str, Any], flags: bool = False) -> TLoRASettings:
        """Settings from a complete dict of fields (as merged by tlora.runs.reading), checked."""
        return cls(**{f.name: known[f.name] for f in fields(cls) if f.name in known}).validate(flags)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"trainer_class": self.trainer_class}
