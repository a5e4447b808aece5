"""The benchmark manifest, typed: the concepts, the methods and the generation and evaluation settings of the
paper's protocol, read and checked from YAML (paths relative to the manifest, names made safe folder names)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from tlora.common.errors import UsageError
from tlora.common.safe_names import safe_component
from tlora.common.usage import load_yaml

IMAGES = {"contextual": 5, "complex": 5, "base": 15}  # images per prompt of each group (the paper's)
NUM_PROMPTS = {"contextual": 25, "complex": 6}
KINDS = ("live", "object")


def prompt_set(kind: str) -> tuple[list[str], list[str]]:
    """(contextual, complex) prompt templates of the paper for a `live` or `object` concept."""
    if kind not in KINDS:
        raise UsageError(f"manifest: concept kind must be live or object, got {kind!r}; fix the manifest")
    lines = resources.files("tlora").joinpath(f"prompts/prompts_{kind}.txt").read_text().splitlines()
    lines = [line.strip() for line in lines if line.strip()]
    return lines[:25], lines[25:]


@dataclass
class Named:
    name: str

    @property
    def folder_name(self) -> str:
        """The name as one safe folder name (never a path)."""
        return safe_component(str(self.name))


@dataclass
class Concept(Named):
    image: str  # the reference image (the one training image)
    class_name: str
    kind: str = "live"  # live or object: which of the paper's prompt sets


@dataclass
class Method(Named):
    config: str  # a train.py --config file
    overrides: dict[str, Any] = field(default_factory=dict)  # more train.py flags


@dataclass
class Manifest:
    output_dir: Path
    concepts: list[Concept]
    methods: list[Method]
    placeholder_token: str = "sks"
    pretrained_model_name_or_path: str | None = None
    pretrained_vae_model_name_or_path: str | None = None
    images: dict = field(default_factory=lambda: dict(IMAGES))
    num_prompts: dict = field(default_factory=lambda: dict(NUM_PROMPTS))
    num_inference_steps: int | None = None  # None: the model family's default
    guidance_scale: float | None = None
    seed: int = 0
    evaluation: dict = field(default_factory=dict)  # clip_model, dino_model, mask_dir
    report_to: str = "none"
    project_name: str = "tlora"

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        """Read and check a manifest: paths relative to it, names made safe folder names, one-line errors."""
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise UsageError(f"manifest {path}: cannot read it ({err.strerror}); pass a YAML manifest") from None
        values = load_yaml(text, f"manifest {path}") or {}
        if not isinstance(values, dict):
            raise UsageError(f"manifest {path}: must be a mapping (see python -m tlora.benchmark --help)")
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise UsageError(f"manifest {path}: unknown key {sorted(unknown)[0]!r}; fix the manifest")
        for key in ("output_dir", "concepts", "methods"):
            if not values.get(key):
                raise UsageError(f"manifest {path}: {key} is required; add it")
        base = Path(path).resolve().parent
        values["output_dir"] = base / values["output_dir"]
        values["concepts"] = _entries(path, "concepts", values["concepts"], Concept)
        values["methods"] = _entries(path, "methods", values["methods"], Method)
        for concept in values["concepts"]:
            concept.image = str(base / concept.image)
            prompt_set(concept.kind)
        for method in values["methods"]:
            method.config = str(base / method.config)
        for key, defaults in (("images", IMAGES), ("num_prompts", NUM_PROMPTS)):
            values[key] = _counts(path, key, values.get(key) or {}, defaults)
        evaluation = values.get("evaluation") or {}
        if not isinstance(evaluation, dict):
            raise UsageError(f"manifest {path}: evaluation must be a mapping (clip_model, dino_model, mask_dir)")
        if evaluation.get("mask_dir"):
            evaluation["mask_dir"] = str(base / evaluation["mask_dir"])
        values["evaluation"] = evaluation
        return cls(**values)

    def jobs(self) -> list[tuple[Concept, Method]]:
        return [(c, m) for c in self.concepts for m in self.methods]


def _entries(path, key: str, items, kind: type) -> list:
    """Every entry of `concepts` or `methods` as its type, with the required fields and names unique as folders."""
    required = [f.name for f in fields(kind) if f.default is MISSING and f.default_factory is MISSING]
    out = []
    for item in items if isinstance(items, list) else [items]:
        allowed = {f.name for f in fields(kind)}
        if not isinstance(item, dict) or any(k not in item for k in required) or set(item) - allowed:
            raise UsageError(f"manifest {path}: every entry of {key} needs {', '.join(required)} (and only "
                             f"{', '.join(sorted(allowed))}): fix {item!r}")
        out.append(kind(**item))
    names = [entry.folder_name for entry in out]
    if len(set(names)) != len(names):
        raise UsageError(f"manifest {path}: two {key} share a name; give each its own")
    return out


def _counts(path, key: str, given, defaults: dict[str, int]) -> dict[str, int]:
    """A partial mapping of counts over its defaults (images: {base: 3} keeps contextual and complex)."""
    if not isinstance(given, dict) or set(given) - set(defaults):
        raise UsageError(f"manifest {path}: {key} must be a mapping with keys among {', '.join(defaults)}")
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"manifest {path}: {key}.{name} must be a whole number of at least 1, got {value!r}")
    return {**defaults, **given}
