"""The protocol manifest, typed: the concepts, the methods and the generation and evaluation settings of the
paper's protocol, read and checked from YAML (paths relative to the manifest, names made safe folder names)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from tlora.common.errors import UsageError
from tlora.common.images import IMAGE_EXTENSIONS
from tlora.common.safe_names import safe_component
from tlora.common.text_files import load_yaml, read_text
from tlora.common.values import check_count, check_guidance, check_seed, shown

IMAGES = {"contextual": 5, "complex": 5, "base": 15}  # images per prompt of each group (the paper's)
NUM_PROMPTS = {"contextual": 25, "complex": 6}
KINDS = ("live", "object")
FIX = "fix the manifest"
TEXT = ("output_dir", "placeholder_token", "pretrained_model_name_or_path", "pretrained_vae_model_name_or_path",
        "report_to", "project_name")
REQUIRED_TEXT = ("output_dir", "placeholder_token", "report_to", "project_name")  # the others may be null
REPORT_TO = ("none", "wandb", "tensorboard")  # train.py's --report_to (the protocol's own table: wandb only)
EVALUATION_KEYS = ("clip_model", "dino_model", "mask_dir")
# train.py flags each job gets from the manifest (a method's overrides would break the protocol's layout)
SET_BY_PROTOCOL = ("config", "train_data_dir", "instance_data_dir", "one_image", "output_dir", "class_name",
                    "placeholder_token", "resume_from_checkpoint")


def prompt_set(kind: str) -> tuple[list[str], list[str]]:
    """(contextual, complex) prompt templates of the paper for a `live` or `object` concept."""
    if kind not in KINDS:
        raise UsageError(f"manifest: concept kind must be live or object, got {shown(kind)}; fix the manifest")
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
    height: int | None = None  # None: the pipeline's own, as inference.py
    width: int | None = None
    seed: int = 0
    evaluation: dict = field(default_factory=dict)  # clip_model, dino_model, mask_dir
    report_to: str = "none"
    project_name: str = "tlora"

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        """Read and check a manifest: paths relative to it, names made safe folder names, every value of the type
        and range it needs; one-line errors naming the manifest and the fix."""
        where = f"manifest {path}"
        values = load_yaml(read_text(path, "manifest", "pass a YAML manifest"), where, FIX) or {}
        if not isinstance(values, dict):
            raise UsageError(f"{where} must hold a mapping of settings (output_dir, concepts, methods, ...), not "
                             f"{_kind(values)}; {FIX}")
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                raise UsageError(f"{where}: unknown key {shown(key)}; {FIX} (its keys: {', '.join(known)})")
        for key in ("output_dir", "concepts", "methods"):
            if values.get(key) in (None, "", [], {}):
                raise UsageError(f"{where}: {key} is required; add it")
        for key in TEXT:
            if key in values and not isinstance(values[key], str) and (values[key] is not None or key in REQUIRED_TEXT):
                raise UsageError(f"{where}: {key} must be text, got {shown(values[key])}; {FIX}")
        if values.get("report_to", "none") not in REPORT_TO:
            raise UsageError(f"{where}: report_to must be one of {', '.join(REPORT_TO)}, got "
                             f"{shown(values['report_to'])}; {FIX}")
        _numbers(where, values)
        base = Path(path).resolve().parent
        values["output_dir"] = base / values["output_dir"]
        values["concepts"] = _entries(where, "concepts", values["concepts"], Concept)
        values["methods"] = _entries(where, "methods", values["methods"], Method)
        for concept in values["concepts"]:
            concept.image = str(base / concept.image)
            prompt_set(concept.kind)
        for method in values["methods"]:
            method.config = str(base / method.config)
            _overrides(where, method)
        for key, defaults in (("images", IMAGES), ("num_prompts", NUM_PROMPTS)):
            values[key] = _counts(where, key, {} if values.get(key) is None else values[key], defaults)
        values["evaluation"] = _evaluation(where, base, values.get("evaluation"), values["concepts"])
        return cls(**values)

    def jobs(self) -> list[tuple[Concept, Method]]:
        return [(c, m) for c in self.concepts for m in self.methods]


def _kind(value) -> str:
    """What a YAML value is, in words."""
    return {list: "a list", dict: "a mapping", str: "text", bool: "true/false", type(None): "nothing"}.get(
        type(value), "a number")


def _entries(where: str, key: str, items, kind: type) -> list:
    """Every entry of `concepts` or `methods` as its type, with the required fields and names unique as folders."""
    required = [f.name for f in fields(kind) if f.default is MISSING and f.default_factory is MISSING]
    allowed = {f.name for f in fields(kind)}
    out = []
    for item in items if isinstance(items, list) else [items]:
        if not isinstance(item, dict) or any(k not in item for k in required) or set(item) - allowed:
            raise UsageError(f"{where}: every entry of {key} needs {', '.join(required)} (and only "
                             f"{', '.join(sorted(allowed))}): fix {shown(item)}")
        for name, value in item.items():
            if name != "overrides" and not isinstance(value, str):
                raise UsageError(f"{where}: {key} entry {shown(item.get('name'))}: {name} must be text, got "
                                 f"{shown(value)}; {FIX}")
        if not item["name"].strip():
            raise UsageError(f"{where}: a {key} entry has an empty name; give each a name")
        out.append(kind(**item))
    names = [entry.folder_name for entry in out]
    if len(set(names)) != len(names):
        raise UsageError(f"{where}: two {key} share a name; give each its own")
    return out


def _overrides(where: str, method: Method) -> None:
    """A method's train.py flags: a mapping of flag names to single values, none of those the protocol sets."""
    given = method.overrides if method.overrides is not None else {}
    if not isinstance(given, dict):
        raise UsageError(f"{where}: method {shown(method.name)}: overrides must be a mapping of train.py flag names "
                         f"to values, not {_kind(given)}; {FIX}")
    for flag, value in given.items():
        if not isinstance(flag, str):
            raise UsageError(f"{where}: method {shown(method.name)}: overrides key {shown(flag)} is not a flag "
                             f"name; {FIX}")
        if flag.lstrip("-") in SET_BY_PROTOCOL:
            raise UsageError(f"{where}: method {shown(method.name)}: overrides cannot set {flag}, which the "
                             f"protocol sets for every job ({', '.join(SET_BY_PROTOCOL)}); remove it")
        if isinstance(value, (list, dict)):
            raise UsageError(f"{where}: method {shown(method.name)}: overrides {flag} must be a single value, got "
                             f"{shown(value)}; {FIX}")
    method.overrides = {flag.lstrip("-"): value for flag, value in given.items()}


def _numbers(where: str, values: dict) -> None:
    """seed, num_inference_steps, guidance_scale, height and width: whole numbers and finite numbers in their
    ranges (a size's multiple is the model family's, checked with each job's flags)."""
    if values.get("seed") is not None:
        check_seed(f"{where}: seed", values["seed"])
    else:
        values.pop("seed", None)
    for key in ("num_inference_steps", "height", "width"):
        if values.get(key) is not None:
            check_count(f"{where}: {key}", values[key], FIX)
    if values.get("guidance_scale") is not None:
        try:
            check_guidance(f"{where}: guidance_scale", values["guidance_scale"])
        except UsageError as err:
            raise UsageError(f"{err}; {FIX}") from None


def _counts(where: str, key: str, given, defaults: dict[str, int]) -> dict[str, int]:
    """A partial mapping of counts over its defaults (images: {base: 3} keeps contextual and complex)."""
    if not isinstance(given, dict) or set(given) - set(defaults):
        raise UsageError(f"{where}: {key} must be a mapping with keys among {', '.join(defaults)}, got "
                         f"{shown(given)}; {FIX}")
    for name, value in given.items():
        check_count(f"{where}: {key}.{name}", value, FIX)
        if key == "num_prompts" and value > defaults[name]:
            raise UsageError(f"{where}: num_prompts.{name} is {value}, but the protocol has {defaults[name]} {name} "
                             f"prompts; pass at most {defaults[name]}")
    return {**defaults, **given}


def _evaluation(where: str, base: Path, given, concepts: list[Concept]) -> dict:
    """clip_model, dino_model (names as given) and mask_dir (relative to the manifest; a mask for each concept)."""
    given = {} if given is None else given
    if not isinstance(given, dict) or set(given) - set(EVALUATION_KEYS):
        raise UsageError(f"{where}: evaluation must be a mapping with keys among {', '.join(EVALUATION_KEYS)}, got "
                         f"{shown(given)}; {FIX}")
    for key, value in given.items():
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"{where}: evaluation.{key} must be text, got {shown(value)}; {FIX}")
    evaluation = dict(given)
    if evaluation.get("mask_dir"):
        masks = base / evaluation["mask_dir"]
        if not masks.is_dir():
            raise UsageError(f"{where}: evaluation.mask_dir {masks} is not a folder; pass the folder of the "
                             "concepts' masks (relative to the manifest)")
        for concept in concepts:
            stem = Path(concept.image).stem  # as metrics.reference_images finds it
            if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in masks.glob(stem + ".*")):
                raise UsageError(f"{where}: evaluation.mask_dir {masks} has no mask named {stem}.* for concept "
                                 f"{shown(concept.name)}; add one (white = the subject)")
        evaluation["mask_dir"] = str(masks)
    return evaluation
