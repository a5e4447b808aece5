"""Every family end to end, on its tiny model and on a second build with other widths and head counts: the stock
pipeline switching standard LoRAs exported at each step's timestep gives the latents tlora.load gives; the exported
update at T has rank r(T) in each branch; train.py trains (T-LoRA and Vanilla T-LoRA) and inference.py samples the
run; the estimate answers for the published model and for a model folder. A new family gets these by being
listed in tlora.families.FAMILIES with its tiny model, and its case in families_case.CASES."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import tlora
from tlora.families import FAMILIES
from tlora.interop import exporting
from tlora.runs.weights import save_weights

from families_case import CASES, Case
from helpers import left_as_found, perturb

BUILDS_BY_NAME = ("tiny", "wide")  # the fixtures <build>_<family> hold each build's folder
BUILDS = ("tiny", pytest.param("wide", marks=pytest.mark.slow))


@pytest.fixture(params=BUILDS)
def built(family, request):
    """The family's case on its tiny model, then on its second build (other widths): left as it was found."""
    pipe = request.getfixturevalue(f"{family}_pipe" if request.param == "tiny" else f"wide_{family}_pipe")
    case = Case(family, pipe, CASES[family])
    yield case
    left_as_found(pipe)


def trained_checkpoint(case: Case, folder, trainer_type: str = "ortho_lora", rank: int = 8, min_rank: int = 2):
    """A T-LoRA on the case's denoiser with every parameter moved off its start, saved as train.py saves it and
    taken off again."""
    adapters = tlora.attach(case.pipe, tlora.TLoRASettings(trainer_type, rank, min_rank))
    perturb(adapters, seed=5)
    metadata = adapters.settings.to_metadata() | case.family.model_metadata(case.model)
    save_weights(adapters.state_dict(), folder, metadata)
    settings = adapters.settings
    tlora.unload(case.pipe)
    return folder, settings


def export_at(checkpoint, out, t: int) -> None:
    assert exporting.main([str(checkpoint), "--format", "diffusers", "--mask", f"timestep:{t}", "--out", str(out)]) == 0


def whole_timestep(settings, t: float) -> int:
    """A whole timestep in 0..T-1 with the same active rank as the scheduler's (possibly fractional, or T) t."""
    rank = settings.active_rank(float(t))
    return next(s for s in range(settings.num_train_timesteps) if settings.active_rank(s) == rank)


def latents(case: Case, steps: int, **extra) -> torch.Tensor:
    out = case.pipe(prompt="a photo of sks dog", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                    output_type="latent", **case.call_kwargs, **extra)
    return out.images if hasattr(out, "images") else out.frames  # video pipelines: frames


@pytest.mark.slow
def test_stock_loras_switched_per_step_are_the_tlora(built, tmp_path):
    """`--format diffusers --mask timestep:T` at each step's scheduler timestep, loaded with the pipeline's own
    load_lora_weights and switched per step with set_adapters, gives the final latents of tlora.load."""
    case, steps = built, 3
    checkpoint, settings = trained_checkpoint(case, tmp_path / "checkpoint-1")
    base = latents(case, steps)
    timesteps = case.pipe.scheduler.timesteps.tolist()
    assert len(timesteps) == steps
    tlora.load(case.pipe, checkpoint)
    expected = latents(case, steps)
    tlora.unload(case.pipe)
    names = []
    for i, t in enumerate(timesteps):
        export_at(checkpoint, tmp_path / f"step{i}.safetensors", whole_timestep(settings, t))
        case.pipe.load_lora_weights(str(tmp_path), weight_name=f"step{i}.safetensors", adapter_name=f"step{i}")
        names.append(f"step{i}")

    def switch(pipe, i, t, kwargs):
        pipe.set_adapters(names[min(i + 1, steps - 1)])
        return {}

    case.pipe.set_adapters(names[0])
    try:
        got = latents(case, steps, callback_on_step_end=switch)
    finally:
        case.pipe.unload_lora_weights()
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (expected - base).abs().max() > 1e-3 * base.abs().max()  # the T-LoRA changes the result


@pytest.mark.parametrize("trainer_type", ["lora", "ortho_lora"])
def test_the_update_exported_at_t_has_rank_r_of_t_per_branch(built, trainer_type, tmp_path):
    """The diffusers file at --mask timestep:T: each projection's LoRA holds r(T) components per branch (ortho_lora:
    the trained and the frozen one), and the update they make has that rank."""
    checkpoint, settings = trained_checkpoint(built, tmp_path / "checkpoint-1", trainer_type)
    t, branches = 600, 1 if trainer_type == "lora" else 2
    export_at(checkpoint, tmp_path / "out.safetensors", t)
    tensors = load_file(str(tmp_path / "out.safetensors"))
    downs = {k.removesuffix(".lora_A.weight"): v for k, v in tensors.items() if k.endswith(".lora_A.weight")}
    rank = settings.active_rank(t)
    assert 1 < rank < settings.lora_rank and downs
    for layer, down in downs.items():
        up = tensors[f"{layer}.lora_B.weight"]
        parts = down.shape[0] // (branches * rank)  # projections fused into one layer of the file (FLUX.2's qkv)
        assert down.shape[0] == parts * branches * rank >= branches * rank, layer
        for b in range(parts * branches):
            rows = slice(b * rank, (b + 1) * rank)
            assert torch.linalg.matrix_rank(up[:, rows].double() @ down[rows].double()) == rank, layer
        assert torch.linalg.matrix_rank(up.double() @ down.double()) == parts * branches * rank, layer


def train_flags(family: str, model, data, out, trainer_type: str) -> list[str]:
    """The same train.py command line for every family: 2 steps of a T-LoRA at 64 px in float32."""
    flags = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data), "--output_dir", str(out),
             "--class_name", "dog", "--placeholder_token", "sks", "--trainer_type", trainer_type, "--tlora",
             "--lora_rank", "4", "--min_rank", "2", "--max_train_steps", "2", "--checkpointing_steps", "2",
             "--resolution", "64", "--seed", "0", "--dataloader_num_workers", "0", "--mixed_precision", "no",
             "--optimizer", "adamw", "--pretrained_vae_model_name_or_path", "none"]
    if "max_sequence_length" in FAMILIES[family].train_defaults:
        flags += ["--max_sequence_length", "16"]
    return flags


@pytest.mark.slow
@pytest.mark.parametrize("build, trainer_type", [("tiny", "ortho_lora"), ("tiny", "lora"), ("wide", "ortho_lora")])
def test_train_py_trains_and_inference_py_samples(family, build, trainer_type, image_dir, tmp_path, request):
    import inference
    import train

    model = request.getfixturevalue(f"{build}_{family}")
    assert train.main(train_flags(family, model, image_dir, tmp_path / "out", trainer_type)) == 0
    (run,) = (tmp_path / "out").iterdir()
    hp = yaml.safe_load((run / "logs" / "hparams.yml").read_text())
    assert (hp["family"], hp["trainer_type"], hp["trainer_class"]) == (family, trainer_type, f"{family}_tlora")
    weights = load_file(str(run / "checkpoint-2" / "pytorch_lora_weights.safetensors"))
    trained, start = ("up.weight", None) if trainer_type == "lora" else ("q_layer.weight", "base_q.weight")
    assert any(not torch.equal(v, weights[k.removesuffix(trained) + start] if start else torch.zeros_like(v))
               for k, v in weights.items() if k.endswith(trained))  # it moved off its start
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert inference.main(["--config_path", str(run / "logs/hparams.yml"), "--checkpoint_idx", "2", "--prompts",
                           "a {0} riding a bike", "--num_images_per_prompt", "1", "--num_inference_steps", "2",
                           "--height", "64", "--width", "64"]) == 0
    made = [p for p in (run / "checkpoint-2" / "samples").rglob("*") if p.suffix in (".png", ".mp4", ".gif")]
    assert made and all(p.stat().st_size > 0 for p in made)


@pytest.mark.slow
def test_the_estimate_answers_for_a_folder_and_builds_every_published_model(family, capsys, request):
    """The whole estimate for the family's model folder; and each published architecture built empty on `meta` from
    its config, as the estimate builds it: its family's denoiser, adapters on it, the conditioning shapes its step
    traces (the trace itself is family-agnostic, and test_estimate runs it on klein-4b)."""
    from tlora.families.architectures import empty_pipeline
    from tlora.method.denoiser import DenoiserSpec
    from tlora.train.estimator import main

    for build in BUILDS_BY_NAME:  # the tiny model and its second build
        folder = str(request.getfixturevalue(f"{build}_{family}"))
        assert main(["--pretrained_model_name_or_path", folder, "--resolution", "64", "--rank", "4", "--min_rank",
                     "4", "--json"]) == 0
        figures = json.loads(capsys.readouterr().out)
        assert figures["peak_gb"] > 0 and figures["tflops_per_step"] > 0 and figures["options"]["adapters"] > 0
    recipe = FAMILIES[family]
    for name in recipe.architectures:
        pipe = empty_pipeline(name, torch.bfloat16)
        model = recipe.model(pipe)
        assert recipe.owns(model) and all(p.is_meta for p in model.parameters()), name
        spec: DenoiserSpec = recipe.describe(model)
        assert sum(layer.path is not None for layer in spec.layers) > figures["options"]["adapters"], name
        shapes = recipe.conditioning_shapes(model, 1024, 512)
        assert all(all(n > 0 for n in shape) for shape in shapes.values()), name
        recipe.encoders(pipe)


def test_a_checkpoint_of_another_family_is_refused_naming_both(family, request, tmp_path):
    """Its metadata names its family: on this family's pipeline, one line naming both, and nothing attached."""
    other = "flux" if family == "sdxl" else "sdxl"
    donor = Case(other, request.getfixturevalue(f"{other}_pipe"), CASES[other])
    checkpoint, _ = trained_checkpoint(donor, tmp_path / "checkpoint-1", rank=4)
    pipe = request.getfixturevalue(f"{family}_pipe")
    with pytest.raises(ValueError, match=f"trained on {other}; this is a {family} model") as err:
        tlora.load(pipe, checkpoint)
    assert "\n" not in str(err.value) and tlora.attached(FAMILIES[family].model(pipe)) is None


def test_a_lycoris_file_whose_keys_fit_several_families_loads_on_its_own(request, tmp_path, monkeypatch):
    """An SD 3.5 LyCORIS T-LoRA's keys (`lycoris_transformer_blocks_...`) fit FLUX.1, Chroma and Qwen-Image too:
    read alone its family stays unknown (never a guess that a pipeline then refuses), and it loads on SD 3.5."""
    import copy
    import json

    lycoris_tlora = pytest.importorskip("lycoris.modules.tlora")
    from types import SimpleNamespace

    from lycoris import LycorisNetwork, create_lycoris

    pipe = request.getfixturevalue("sd3_pipe")
    transformer = copy.deepcopy(pipe.transformer)
    monkeypatch.setattr(lycoris_tlora, "gc", SimpleNamespace(collect=lambda *a: 0))
    LycorisNetwork.apply_preset({"target_module": ["Attention"]})
    network = create_lycoris(transformer, 1.0, linear_dim=4, linear_alpha=2, algo="tlora")
    network.apply_to()
    path = tmp_path / "simpletuner_sd3.safetensors"
    network.save_weights(str(path), torch.float32, {"lycoris_config": json.dumps({"algo": "tlora", "linear_dim": 4})})
    network.restore()
    assert tlora.read(path).settings.family == "sd3"  # its attn2 and to_add_out layers are SD3's own
    shared = {k: v for k, v in load_file(str(path)).items() if not FAMILIES["sd3"].distinct_key(k)}
    save_file(shared, str(path), {"lycoris_config": json.dumps({"algo": "tlora", "linear_dim": 4})})
    read = tlora.read(path)  # the joint blocks' attn only: named as FLUX.1's double blocks are
    assert read.settings.family is None and read.sources["family"].startswith("not known")
    for source in (path, read):
        loaded = tlora.load(pipe, source)
        try:
            assert loaded.settings.family == "sd3" and len(loaded.layers) == len({k.split(".")[0] for k in shared})
        finally:
            tlora.unload(pipe)
