"""Our kohya exports load in ComfyUI: every layer they write has a LoRA key ComfyUI maps to the model, and a layer
that fuses projections puts them at the rows where ComfyUI's fused weight has them.

The keys are fixtures (tests/comfyui_keys/<family>.json, written by derive_<family>.py from ComfyUI's
comfy/lora.py model_lora_keys_unet) for the published model; the tiny model has fewer blocks, so each layer of its
file is matched, through the modules it adapts, to the layer the family would write for the published model.
Fixture fields: "keys" (every LoRA key prefix ComfyUI maps), "slices" ({key: [dim, start, length]}: keys mapped
to rows of a fused weight), "rows" ({key: rows}: keys mapped to a whole fused weight), "architecture" (optional:
which of the family's published architectures, when it has several; else its first).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch

import tlora
from tlora.families import FAMILIES, denoiser
from tlora.families.base import Family, Target
from tlora.formats import kohya
from tlora.interop.exporting import main
from tlora.runs.weights import save_weights

from helpers import perturb, read_weights

FIXTURES = Path(__file__).parent / "comfyui_keys"
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
# how ComfyUI's diffusers-style keys name a module path: dotted (diffusers, PEFT) or with "_" (LyCORIS, OneTrainer)
DOTTED, UNDERSCORED = ("", "transformer.", "unet."), ("lycoris_", "lora_transformer_", "lora_unet_")


def fixture_families() -> list[str]:
    """The registered families that have a fixture (other families' fixtures are picked up as they arrive)."""
    return sorted(path.stem for path in FIXTURES.glob("*.json") if path.stem in FAMILIES)


def widths(family: type[Family], model: torch.nn.Module) -> dict[str, int]:
    """Module path -> outputs of each projection the T-LoRA adapts, as the exporter sees them."""
    out = {}
    for layer in family.layers(model):
        if layer.path is not None:
            rows = layer.rows[1] - layer.rows[0] if layer.rows else model.get_submodule(layer.path).out_features
            out[family.module_path(layer.prefix)] = rows
    return out


@cache
def published(name: str, architecture: str | None) -> tuple[dict[str, int], list[Target]]:
    """(projection widths, kohya layers) the family writes for its published denoiser (built on `meta`)."""
    family = FAMILIES[name]
    spec = family.architectures[architecture or next(iter(family.architectures))]
    library, cls_name, config = spec[family.model_attr]
    with torch.device("meta"):  # no weights, and no buffers computed either
        model = getattr(__import__(library, fromlist=[cls_name]), cls_name).from_config(
            {k: v for k, v in config.items() if not k.startswith("_")})
    found = widths(family, model)
    return found, kohya.layers(family, found, family.model_metadata(model))


def slices_of(module: str, slices: dict[str, list[int]]) -> list[list[int]]:
    """The rows ComfyUI maps a projection's diffusers-style keys to, in every style the fixture has."""
    names = [p + module for p in DOTTED] + [p + module.replace(".", "_") for p in UNDERSCORED]
    return [slices[n] for n in names if n in slices]


def check_rows(target: Target, width: dict[str, int], fixture: dict, name: str, scale: bool) -> None:
    """`target`'s projections sit where ComfyUI's slices put them and it has the fused weight's rows; `scale`: the
    tiny model, compared in units of each projection's width (the fixture is for the published widths)."""
    slices, rows = fixture.get("slices", {}), fixture.get("rows", {})
    for module, row in target.parts.items():
        found = slices_of(module, slices)
        assert found or name not in rows, f"{name}: ComfyUI has no slice for {module}"
        for dim, start, length in found:
            assert dim == 0 and (row * length == start * width[module] if scale else [row, width[module]]
                                 == [start, length]), f"{target.name}: {module} at row {row}, ComfyUI {start}"
            if name in rows:
                expected = rows[name] * width[module] / length if scale else rows[name]
                assert target.out_features == expected, f"{target.name}: {target.out_features} rows, not {expected}"


@pytest.mark.parametrize("name", fixture_families())
def test_kohya_exports_write_only_keys_comfyui_maps(name, request, tmp_path):
    """A tiny T-LoRA's kohya file: its layers are the family's, each one (renumbered for the published block counts)
    a key ComfyUI maps, fused rows where ComfyUI's slices put them; and so for the whole published model."""
    family, fixture = FAMILIES[name], json.loads((FIXTURES / f"{name}.json").read_text())
    keys, pipe = set(fixture["keys"]), request.getfixturevalue(f"borrowed_{name}_pipe")  # unloaded when it ends
    model = denoiser(pipe)
    torch.manual_seed(0)
    adapters = tlora.attach(pipe, tlora.TLoRASettings("ortho_lora", 4, 2))
    perturb(adapters)
    meta = adapters.settings.to_metadata() | family.model_metadata(model)
    checkpoint, out = tmp_path / "checkpoint-1", tmp_path / "kohya.safetensors"
    save_weights(adapters.state_dict(), checkpoint, meta)
    tlora.unload(pipe)
    assert main([str(checkpoint), "--format", "kohya", "--out", str(out)]) == 0

    tensors, _ = read_weights(out)
    tiny_widths = widths(family, model)
    tiny = {t.name: t for t in kohya.layers(family, tiny_widths, meta)}
    assert {next(k[:-len(s)] for s in SUFFIXES if k.endswith(s)) for k in tensors} == set(tiny)
    big_widths, big = published(name, fixture.get("architecture"))
    at = {module: target for target in big for module in target.parts}  # published layer of each projection
    for target in tiny.values():
        assert tensors[f"{target.name}.lora_up.weight"].shape[0] == target.out_features
        assert set(target.parts) <= set(at), f"{target.name}: the published model lacks {set(target.parts) - set(at)}"
        mapped = {at[module].name for module in target.parts}
        assert len(mapped) == 1, f"{target.name}: its projections make several published layers, {mapped}"
        assert mapped <= keys, f"{target.name} (published: {mapped}) is not a key ComfyUI maps for {fixture['model']}"
        check_rows(target, tiny_widths, fixture, mapped.pop(), scale=True)
    if "architecture" in fixture or len(family.architectures) == 1:  # the fixture's published model: all of it
        assert not {t.name for t in big} - keys, sorted({t.name for t in big} - keys)[:5]
        for target in big:
            check_rows(target, big_widths, fixture, target.name, scale=False)
