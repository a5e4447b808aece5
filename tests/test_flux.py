"""FLUX.1 on a tiny random FLUX built in code: the authors' keys and random start, the mask through the stock
FluxPipeline, the flow-matching loss, the authors' lora.pt, masked loss, and train -> inference -> evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import tlora
from tlora.common.errors import CheckpointError
from tlora.families import FLUX, attach
from tlora.method.settings import TLoRASettings
from tlora.train.conditioning import Conditioning
from tlora.train.trainer import diffusion_loss

import authors
from helpers import REPO, flux_inputs, flux_train_args, read_weights

HIDDEN = 32  # the tiny FLUX's inner dimension (2 heads x 16)


def test_authors_keys_shapes_and_random_start(flux_pipe):
    transformer = flux_pipe.transformer
    torch.manual_seed(5)
    theirs = authors.flux_start(transformer, 4)
    torch.manual_seed(5)
    ours = attach(transformer, TLoRASettings("lora", 4, 1))
    try:
        state = ours.state_dict()
        used = {k: v for k, v in theirs.items() if not (
            k.startswith("single_transformer_blocks") and ("_proj_lora" in k or "to_out_lora" in k))}
        assert sorted(state) == sorted(used)
        assert len(state) == 2 * (2 * 7 + 2 * 3)  # 2 double blocks x 7 layers, 2 single blocks x 3, down + up
        assert all(torch.equal(state[k], used[k]) for k in used)  # same seed, same start, unused draws included
        assert state["transformer_blocks.0.attn.processor.to_q_proj_lora.down.weight"].shape == (4, HIDDEN)
        assert state["single_transformer_blocks.1.attn.processor.to_v_lora.up.weight"].shape == (HIDDEN, 4)
    finally:
        ours.unload()


def _transformer_inputs(transformer, seed=0):
    return flux_inputs(transformer, 2, seed) | {"timestep": torch.tensor([0.25, 0.9]), "return_dict": False}


def test_integer_training_timesteps_come_back_exactly():
    t = torch.arange(1, 1001, dtype=torch.float32)
    assert torch.equal(FLUX.diffusion_t(t / 1000), t)


def _conditioning(flux_pipe, image: Path, masks=None):
    return Conditioning(FLUX, flux_pipe, [image], "a photo of sks dog", 64, torch.device("cpu"), masks=masks,
                        max_sequence_length=16)


def test_loss_is_the_flow_matching_loss(flux_pipe, image_dir):
    """diffusion_loss equals a hand-written flow-matching loss with the same random numbers."""
    transformer, vae = flux_pipe.transformer, flux_pipe.vae
    scheduler = tlora.families.FLUX.noise_scheduler(flux_pipe)
    batch = _conditioning(flux_pipe, image_dir / "00.png").batch({"instance": torch.tensor([0])})
    torch.manual_seed(3)
    with torch.no_grad():
        loss = diffusion_loss(FLUX, transformer, flux_pipe, scheduler, batch, torch.float32, None, guidance=1.0)
    torch.manual_seed(3)
    x0 = (batch["mean"] + batch["std"] * torch.randn_like(batch["mean"]) - vae.config.shift_factor) * vae.config.scaling_factor
    noise = torch.randn_like(x0)
    t = torch.linspace(1000, 1, 1000)[torch.randint(0, 1000, (1,))]  # FLUX.1-dev's training timesteps: 1000..1
    sigma = t / 1000
    noisy = (1 - sigma) * x0 + sigma * noise
    packed = noisy.reshape(1, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 64)  # 2x2 patches
    ids = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 2)
    with torch.no_grad():
        pred = transformer(hidden_states=packed, timestep=sigma, guidance=torch.ones(1),
                           pooled_projections=batch["pooled"], encoder_hidden_states=batch["prompt_embeds"],
                           txt_ids=torch.zeros(16, 3), img_ids=torch.cat([torch.zeros(16, 1), ids], 1),
                           return_dict=False)[0]
    pred = pred.reshape(1, 4, 4, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, 8, 8)
    assert torch.allclose(loss, ((pred - (noise - x0)) ** 2).mean(), rtol=1e-5, atol=1e-6)


def test_masked_loss(flux_pipe, image_dir, tmp_path):
    """White mask = the plain loss; black mask = zero; a half mask counts only its half."""
    scheduler = tlora.families.FLUX.noise_scheduler(flux_pipe)
    losses = {}
    for name, fill in (("none", None), ("white", 255), ("black", 0)):
        masks = None
        if fill is not None:
            masks = [tmp_path / f"{name}.png"]
            Image.new("L", (96, 80), fill).save(masks[0])
        batch = _conditioning(flux_pipe, image_dir / "00.png", masks).batch({"instance": torch.tensor([0])})
        torch.manual_seed(1)
        with torch.no_grad():
            losses[name] = diffusion_loss(FLUX, flux_pipe.transformer, flux_pipe, scheduler, batch, torch.float32,
                                          None).item()
    assert losses["white"] == losses["none"] > 0 and losses["black"] == 0


def authors_lora_pt(folder: Path, transformer, rank: int = 4) -> dict[str, torch.Tensor]:
    """A lora.pt as the authors' FLUX code writes it (every processor's seven layers), alone in a folder."""
    state = authors.flux_trained(transformer, rank)
    folder.mkdir(parents=True)
    torch.save(state, folder / "lora.pt")
    return state


def test_reads_the_authors_lora_pt(flux_pipe, tmp_path):
    transformer = flux_pipe.transformer
    state = authors_lora_pt(tmp_path / "checkpoint-100", transformer)
    inputs = _transformer_inputs(transformer)
    with torch.no_grad():
        base = transformer(**inputs)[0]
        t = tlora.load(flux_pipe, tmp_path / "checkpoint-100", trainer_class="flux_tlora", min_rank=1)
        out = transformer(**inputs)[0]
    loaded = t.state_dict()
    t.unload()
    assert len(loaded) == 40 and all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert not torch.allclose(out, base)
    # by hand: the first double block's q projection, sample 0 at t = 250 (rank r(250) = int(0.75 * 3) + 1 = 3)
    attn = transformer.transformer_blocks[0].attn
    x = torch.randn(3, HIDDEN)
    down, up = state["transformer_blocks.0.attn.processor.to_q_lora.down.weight"], state[
        "transformer_blocks.0.attn.processor.to_q_lora.up.weight"]
    t = tlora.load(flux_pipe, tmp_path / "checkpoint-100", trainer_class="flux_tlora", min_rank=1)
    try:
        t.state.set_timestep(torch.tensor([250.0]), torch.device("cpu"))
        with torch.no_grad():
            expected = torch.nn.functional.linear(x, attn.to_q.weight, attn.to_q.bias) + (x @ down[:3].T) @ up[:, :3].T
            assert torch.allclose(attn.to_q(x), expected, atol=1e-6)
    finally:
        t.unload()


def test_unknown_keys_in_a_lora_pt_are_refused(flux_pipe, tmp_path):
    state = authors_lora_pt(tmp_path / "run", flux_pipe.transformer)
    state["transformer_blocks.0.attn.processor.to_add_out_lora.down.weight"] = torch.zeros(4, HIDDEN)
    torch.save(state, tmp_path / "run" / "lora.pt")
    with pytest.raises(CheckpointError, match="to_add_out_lora"):
        tlora.load(flux_pipe, tmp_path / "run", trainer_class="flux_lora")
    assert not any("timestep_adapter" in n for n, _ in flux_pipe.transformer.named_modules())


def test_a_pickle_with_code_is_never_unpickled(flux_pipe, tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("unpickled!",))

    (tmp_path / "run").mkdir()
    torch.save({"x": Boom()}, tmp_path / "run" / "lora.pt")
    with pytest.raises(ValueError, match="not a readable tensor file"):
        tlora.load(flux_pipe, tmp_path / "run")


def _batch(n: int, seed: int = 0) -> dict:
    return flux_inputs(None, n, seed) | {"return_dict": False}


@pytest.fixture(scope="module")
def authors_run(tiny_flux, flux_pipe, tmp_path_factory):
    """The authors' FLUX T-LoRA run (their hparams.yml and lora.pt, as their code writes them): rank 8, min_rank 3."""
    state = authors.flux_trained(flux_pipe.transformer, 8)
    return authors.flux_run(tmp_path_factory.mktemp("their_flux"), tiny_flux, state, rank=8, min_rank=3), state


def test_the_authors_flux_run_equals_their_tlora_at_every_timestep(flux_pipe, authors_run, recwarn):
    """tlora.load on their run (untouched) gives their T-LoRA's transformer output at t = 999..0, masked as theirs."""
    run, state = authors_run
    transformer = flux_pipe.transformer
    t = torch.arange(999, -1, -1, dtype=torch.float32)
    expected = torch.cat([authors.their_flux_forward(transformer, state, c, 8, 3, **_batch(len(c), i))
                          for i, c in enumerate(t.split(250))])
    loaded = tlora.load(flux_pipe, run / "checkpoint-10" / "lora.pt", run / "logs" / "hparams.yml")
    try:
        assert loaded.settings.trainer_class == "flux_tlora" and loaded.settings.rule == "multiply_first"
        with torch.no_grad():
            got = torch.cat([transformer(timestep=c / 1000, **_batch(len(c), i))[0] for i, c in enumerate(t.split(250))])
    finally:
        tlora.unload(flux_pipe)
    assert (got - expected).abs().max() <= 1e-5
    base = torch.cat([authors.their_flux_forward(transformer, state, c, 8, None, **_batch(len(c), i))
                      for i, c in enumerate(t.split(250))])
    assert (base - expected)[0].abs().max() > 1e-3  # without the mask (what tlora did before) it differs at t = 999
    assert not [w for w in recwarn if issubclass(w.category, tlora.AssumedSetting)]  # their run says everything


def test_the_authors_flux_run_is_read_from_its_folder(authors_run, flux_pipe):
    run, state = authors_run
    ckpt = tlora.read(run)  # the run folder alone: its newest checkpoint's lora.pt, its logs/hparams.yml
    hparams = str(run / "logs" / "hparams.yml") + " (the authors' FLUX keys)"
    assert ckpt.path == run / "checkpoint-10" / "lora.pt" and ckpt.hparams_path == run / "logs" / "hparams.yml"
    s = ckpt.settings
    assert (s.family, s.trainer_type, s.trainer_class, s.lora_rank, s.min_rank, s.alpha_rank_scale) == (
        "flux", "lora", "flux_tlora", 8, 3, 1.0)
    assert ckpt.sources["timestep_dependent"] == ckpt.sources["min_rank"] == ckpt.sources["lora_rank"] == hparams
    assert ckpt.assumed == {} and len(ckpt.tensors()) == 2 * (2 * 7 + 2 * 3)  # the unused single-block keys skipped


@pytest.mark.slow
def test_inference_and_analyze_on_the_authors_flux_run(authors_run, tmp_path):
    from tlora.evaluation.analysis import analyze

    import inference

    run, _ = authors_run
    argv = ["--config_path", str(run / "logs" / "hparams.yml"), "--checkpoint_idx", "10", "--prompts",
            "a {0} riding a bike", "--num_images_per_prompt", "1", "--num_inference_steps", "1"]
    assert inference.main(argv) == 0  # their hparams.yml names no family, VAE or lora_rank
    image = run / "checkpoint-10/samples/ns1gs3.5/version_0/a sks riding a bike/0.png"  # their layout
    # their size: FluxPipeline's default (1024 px here too), whatever the run was trained at (64 px)
    assert Image.open(image).size == (1024, 1024)
    layers = json.loads((analyze(run) / "effective_rank.json").read_text())
    kinds = {v["kind"] for v in layers.values()}
    assert kinds == {"double-image", "double-text", "single"} and len(layers) == 2 * 7 + 2 * 3


def test_export_authors_format_on_flux(authors_run, flux_pipe, tmp_path):
    """Their run, and our file of it, both export to a lora.pt with every key their strict loader wants."""
    from tlora.interop import exporting

    run, state = authors_run
    out = tmp_path / "checkpoint-10" / "lora.pt"
    assert exporting.main([str(run), "--format", "authors", "--out", str(out)]) == 0
    written = torch.load(out, weights_only=True)
    assert list(written) == list(state) and all(written[k].shape == state[k].shape for k in state)
    used = tlora.read(run).tensors()
    assert all(torch.equal(written[k], v) for k, v in used.items())
    assert exporting.main([str(run), "--format", "authors", "--out", str(tmp_path / "x.safetensors")]) == 2


@pytest.mark.parametrize("t", [999, 500, 0])
def test_the_authors_flux_run_exports_to_diffusers_and_kohya(authors_run, flux_pipe, tmp_path, t):
    """Their run at a fixed mask: a diffusers file that a stock FluxPipeline loads and that equals their T-LoRA, and
    a kohya file holding exactly the same updates under BFL's names, q, k, v fused (linear1's MLP rows zero)."""
    from tlora.interop import exporting

    run, state = authors_run
    transformer, diffusers_file, kohya_file = flux_pipe.transformer, tmp_path / "d.safetensors", tmp_path / "k.safetensors"
    assert exporting.main([str(run), "--format", "diffusers", "--out", str(diffusers_file), "--mask", f"timestep:{t}"]) == 0
    assert exporting.main([str(run), "--format", "kohya", "--out", str(kohya_file), "--mask", f"timestep:{t}"]) == 0
    expected = authors.their_flux_forward(transformer, state, torch.tensor([float(t)]), 8, 3, **_batch(1, 3))
    flux_pipe.load_lora_weights(str(diffusers_file), adapter_name="export")
    try:
        with torch.no_grad():
            got = transformer(timestep=torch.tensor([t / 1000]), **_batch(1, 3))[0]
    finally:
        flux_pipe.unload_lora_weights()  # the session pipeline as it was: no peft layers left
    assert (got - expected).abs().max() <= 1e-5
    ours, _ = read_weights(diffusers_file)
    update = {k[len("transformer."):-len(".lora_A.weight")]: ours[k.replace("lora_A", "lora_B")] @ v
              for k, v in ours.items() if ".lora_A." in k}
    theirs, meta = read_weights(kohya_file)
    assert meta["ss_base_model_version"] == "flux1" and len(theirs) == 3 * (2 * 3 + 2)
    fused = {k[:-len(".lora_down.weight")]: theirs[k.replace("down", "up")] @ v * (
        theirs[k.replace("lora_down.weight", "alpha")] / v.shape[0]) for k, v in theirs.items() if "lora_down" in k}
    zero = torch.zeros(HIDDEN, HIDDEN)
    for i in range(2):
        a = f"transformer_blocks.{i}.attn"
        for name, parts in (("img_attn_qkv", ("to_q", "to_k", "to_v")), ("txt_attn_qkv", ("add_q_proj", "add_k_proj",
                            "add_v_proj")), ("img_attn_proj", ("to_out.0",))):
            want = torch.cat([update[f"{a}.{p}"] for p in parts])
            assert torch.allclose(fused[f"lora_unet_double_blocks_{i}_{name}"], want, atol=1e-6)
        s = f"single_transformer_blocks.{i}.attn"
        want = torch.cat([update[f"{s}.{p}"] for p in ("to_q", "to_k", "to_v")] + [zero.repeat(4, 1)])
        assert torch.allclose(fused[f"lora_unet_single_blocks_{i}_linear1"], want, atol=1e-6)


def run(script: str, *argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(REPO / script), *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_authors_command_trains_then_inference_and_evaluate(tiny_flux, flux_pipe, image_dir, tmp_path,
                                                            tiny_embedder_dir):
    masks = tmp_path / "masks"
    masks.mkdir()
    for image in ("00.png", "01.jpg"):  # each its image's size
        Image.new("L", Image.open(image_dir / image).size, 255).save(masks / Path(image).with_suffix(".png").name)
    run("train.py", *flux_train_args(tiny_flux, image_dir, tmp_path / "out", "--mask_dir", str(masks),
                                     "--validation_prompt", "a {0} on the beach", "--num_validation_images", "1",
                                     "--validation_height", "64", "--validation_width", "32"))
    (folder,) = (tmp_path / "out").iterdir()
    assert folder.name.endswith(f"{image_dir.name}_tlora4")
    hp = yaml.safe_load((folder / "logs" / "hparams.yml").read_text())
    assert (hp["family"], hp["trainer_type"], hp["trainer_class"], hp["lora_rank"], hp["min_rank"]) == (
        "flux", "lora", "flux_tlora", 4, 1)
    assert (hp["optimizer"], hp["learning_rate"], hp["max_grad_norm"], hp["mixed_precision"]) == ("prodigy", 1.0, 1.0, "bf16")
    assert all(hp.get(k) is not None for k in authors.FLUX_INFERENCE_KEYS)  # what their run_inference.py reads
    assert (hp["tlora"], hp["rank"], hp["output_dir"]) == (True, 4, str(folder))
    weights, meta = read_weights(folder / "checkpoint-2")
    assert meta["family"] == "flux" and len(weights) == 40
    assert any(v.abs().sum() > 0 for k, v in weights.items() if k.endswith(".up.weight"))  # it trained
    assert (folder / "checkpoint-2/samples/ns28gs3.5/version_0/a sks on the beach/0.png").is_file()
    run("inference.py", "--config_path", str(folder / "logs/hparams.yml"), "--checkpoint_idx", "2",
        "--prompts", "a {0} riding a bike", "--num_images_per_prompt", "2", "--num_inference_steps", "3",
        "--height", "64", "--width", "48")
    samples = folder / "checkpoint-2/samples/ns3gs3.5/version_0"
    images = sorted((samples / "a sks riding a bike").glob("?.png"))
    assert [Image.open(p).size for p in images] == [(48, 64), (48, 64)]
    assert Image.open(folder / "checkpoint-2/samples/ns28gs3.5/version_0/a sks on the beach/0.png").size == (32, 64)
    from tlora.evaluation import scoring
    from tlora.interop import exporting

    # --format authors: the lora.pt their run_inference.py loads from checkpoint-N, strictly (every key they make)
    out = folder / "checkpoint-2" / "lora.pt"
    assert exporting.main([str(folder / "checkpoint-2"), "--format", "authors", "--out", str(out)]) == 0
    theirs = torch.load(out, weights_only=True)
    start = authors.flux_start(flux_pipe.transformer, 4)
    assert list(theirs) == list(start) and all(theirs[k].shape == start[k].shape for k in start)
    assert all(torch.equal(theirs[k], v) for k, v in weights.items())

    assert scoring.main(["--samples", str(samples), "--reference", str(image_dir / "00.png"), "--class_name", "dog",
                          "--placeholder_token", "sks", "--clip_model", str(tiny_embedder_dir / "clip"),
                          "--dino_model", str(tiny_embedder_dir / "dino"), "--device", "cpu"]) == 0
    metrics = yaml.safe_load((samples / "metrics.json").read_text())
    assert set(metrics["TS_per_prompt"]) == {"a {0} riding a bike"} and -1 <= metrics["TS"] <= 1


def test_in_bf16_the_mask_and_the_scheduled_export_follow_the_timestep_as_the_pipeline_casts_it(tiny_flux):
    """FluxPipeline casts each scheduler timestep to the latents' dtype before dividing by 1000: in bf16 the
    transformer, and so the mask, see t moved by a few. Family.scheduler_t (what tlora.scheduled switches chunks
    by) computes it the same way: at every step it gives the rank the live mask has."""
    from tlora.families.pipelines import load_pipeline

    pipe = load_pipeline(str(tiny_flux), "none", dtype=torch.bfloat16)
    adapters = tlora.attach(pipe, TLoRASettings("lora", 64, 1))
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(int(adapters.state.mask[0].sum())),
                                               with_kwargs=True)
    pipe(prompt="a photo of sks dog", num_inference_steps=28, height=64, width=64, max_sequence_length=16,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    steps = pipe.scheduler.timesteps.tolist()
    cast = [adapters.settings.active_rank(FLUX.scheduler_t(t, torch.bfloat16)) for t in steps]
    exact = [adapters.settings.active_rank(FLUX.scheduler_t(t)) for t in steps]
    assert seen == cast and cast != exact  # the cast moves some steps across a rank boundary
