"""FLUX.2 [klein]: what is its own (q, k, v inside the fused single-block layer, telling its files from FLUX.1's,
SimpleTuner's FLUX.2 files, the FLUX command line); what it shares with the other families is in test_families."""

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

import tlora
from tlora.families import FAMILIES, of_keys
from tlora.method.injection import ADAPTER, RowAdapters
from tlora.runs.weights import save_weights

from helpers import flux_train_args, klein_inputs, perturb, read_weights, tlora_and_export_outputs


def other_klein(pipe) -> Flux2KleinPipeline:
    """A klein built apart from the tiny one: other widths, heads, block counts and MLP ratio (not 3.0), on the
    same text encoder and VAE."""
    torch.manual_seed(5)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=3, attention_head_dim=8, num_attention_heads=3,
        joint_attention_dim=pipe.transformer.config.joint_attention_dim, timestep_guidance_channels=16,
        mlp_ratio=2.5, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False,
    )
    other = Flux2KleinPipeline(**{**pipe.components, "transformer": transformer})
    other.set_progress_bar_config(disable=True)
    return other


def test_single_blocks_adapt_q_k_v_inside_the_fused_layer(klein_pipe):
    """Each of q, k, v has its own adapter on its rows of to_qkv_mlp_proj; the MLP rows are left as they are."""
    transformer = klein_pipe.transformer
    fused = transformer.single_transformer_blocks[0].attn.to_qkv_mlp_proj
    x = torch.randn(2, 5, fused.in_features)
    with torch.no_grad():
        before = fused(x)
    adapters = tlora.attach(transformer, tlora.TLoRASettings("lora", 4, 4))
    try:
        perturb(adapters, seed=3)
        container = getattr(fused, ADAPTER)
        inner = transformer.single_transformer_blocks[0].attn.inner_dim
        assert isinstance(container, RowAdapters) and container.rows == [(0, inner), (inner, 2 * inner),
                                                                          (2 * inner, 3 * inner)]
        prefix = "single_transformer_blocks.0.attn.processor.to_qkv_mlp_{}_lora"
        with torch.no_grad():
            after = fused(x)
            for i, name in enumerate("qkv"):
                delta = adapters.adapters[prefix.format(name)](x)
                assert torch.allclose(after[..., i * inner:(i + 1) * inner], before[..., i * inner:(i + 1) * inner]
                                      + delta, atol=1e-6)
        assert torch.equal(after[..., 3 * inner:], before[..., 3 * inner:])  # the MLP input untouched
        with torch.no_grad(), pytest.MonkeyPatch.context() as patch:  # the step adds into the rows: no zero blocks
            patch.setattr(RowAdapters, "forward", lambda *a: pytest.fail("the full-width update was built"))
            assert torch.equal(fused(x), after)
        with torch.no_grad():  # the update alone, read; the step's add writes into the layer's output itself
            expected, out = before + container(x), before.clone()
            assert container.add_to(out, x, None) is out and torch.equal(out, expected)
        assert len(adapters.linears) == len(adapters.layers) - 2 * 2  # 3 adapters on each single block's one Linear
    finally:
        tlora.unload(transformer)
    assert not hasattr(fused, ADAPTER) and len(fused._forward_hooks) == 0


def test_keys_tell_klein_from_flux(klein_pipe, flux_pipe, tmp_path):
    klein = tlora.attach(klein_pipe.transformer, tlora.TLoRASettings("lora", 4, 1))
    klein_keys = list(klein.state_dict())
    tlora.unload(klein_pipe)
    flux = tlora.attach(flux_pipe.transformer, tlora.TLoRASettings("lora", 4, 1))
    flux_keys = list(flux.state_dict())
    tlora.unload(flux_pipe)
    assert of_keys(klein_keys)[0] == "klein" and of_keys(flux_keys)[0] == "flux"
    double_only = [k for k in klein_keys if k.startswith("transformer_blocks.")]
    assert {"flux", "klein"} <= set(of_keys(double_only))  # the double blocks are named alike (so are others')
    lycoris = ["lycoris_single_transformer_blocks_0_attn_to_qkv_mlp_proj.q_layer.weight",
               "lycoris_transformer_blocks_0_ff_linear_in.q_layer.weight"]
    assert of_keys(lycoris)[0] == "klein"
    assert of_keys(["lycoris_single_transformer_blocks_0_attn_to_q.q_layer.weight"])[0] == "flux"
    # a klein checkpoint copied alone into an empty folder: its keys say klein, and a FLUX.1 pipeline refuses it
    save_weights(read_weights_of(klein_pipe), tmp_path / "alone", {"trainer_type": "lora", "lora_rank": 4})
    ckpt = tlora.read(tmp_path / "alone")
    assert ckpt.settings.family == "klein" and ckpt.sources["family"] == "the tensors"
    with pytest.raises(ValueError, match="was trained on klein; this is a flux model"):
        tlora.load(flux_pipe, tmp_path / "alone")
    save_weights(read_weights_of(flux_pipe), tmp_path / "flux", {"trainer_type": "lora", "lora_rank": 4})
    with pytest.raises(ValueError, match="was trained on flux; this is a klein model"):
        tlora.load(klein_pipe, tmp_path / "flux")  # the prefixes fit both; a single block's own to_q is FLUX.1's
    double = {k: v for k, v in read_weights_of(klein_pipe).items() if k in double_only}
    save_weights(double, tmp_path / "double", {"trainer_type": "lora", "lora_rank": 4, "trainer_class": "klein_lora"})
    assert tlora.read(tmp_path / "double").settings.family == "klein"  # the record says which
    save_weights(double, tmp_path / "unsaid", {"trainer_type": "lora", "lora_rank": 4})
    fit = "its keys fit flux, klein(, [a-z_0-9]+)* and [a-z_0-9]+ models and nothing records which"
    with pytest.warns(tlora.AssumedSetting, match=fit):
        assert tlora.read(tmp_path / "unsaid").settings.family == "flux"
    assert tlora.read(tmp_path / "unsaid", family="klein").settings.family == "klein"  # as tlora.load on a klein


def read_weights_of(pipe) -> dict:
    adapters = tlora.attach(pipe.transformer, tlora.TLoRASettings("lora", 4, 1))
    try:
        return adapters.state_dict()
    finally:
        tlora.unload(pipe)


@pytest.fixture(scope="module", params=[("tiny", "lora"), ("other", "ortho_lora"), ("other", "lora")],
                ids=lambda p: "-".join(p))
def klein_checkpoint(request, tiny_klein, klein_pipe, tmp_path_factory):
    """A perturbed (as if trained) T-LoRA of the tiny klein (a pipeline of its own) or of the other one, with the
    metadata our runs write."""
    from tlora.families.pipelines import load_pipeline

    model, trainer_type = request.param
    pipe = load_pipeline(str(tiny_klein), "none") if model == "tiny" else other_klein(klein_pipe)
    torch.manual_seed(0)
    adapters = tlora.attach(pipe.transformer, tlora.TLoRASettings(trainer_type, 4, 2))
    perturb(adapters, seed=7)
    folder = tmp_path_factory.mktemp(f"klein_{model}_{trainer_type}") / "checkpoint-10"
    meta = adapters.settings.to_metadata() | FAMILIES["klein"].model_metadata(pipe.transformer)
    save_weights(adapters.state_dict(), folder, meta)
    tlora.unload(pipe)
    return pipe, folder


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_exports_load_in_flux2_klein_and_equal_the_tlora(klein_checkpoint, tmp_path, fmt):
    """On the tiny klein and on the other one, whose fused layer is 3 x 24 + 2 x 60 rows (MLP ratio 2.5, from the
    checkpoint's metadata): the export fuses q, k, v into to_qkv_mlp_proj (kohya: linear1) exactly, and
    Flux2KleinPipeline.load_lora_weights reads both layouts."""
    from tlora.interop.exporting import main

    pipe, checkpoint = klein_checkpoint
    transformer, inputs = pipe.transformer, klein_inputs(pipe.transformer, 1, 0)
    for t in (999, 500, 0):
        out = tmp_path / f"{fmt}_{t}.safetensors"
        assert main([str(checkpoint), "--format", fmt, "--out", str(out), "--mask", f"timestep:{t}"]) == 0
        step = torch.tensor([t / 1000])
        expected, got, base = tlora_and_export_outputs(
            pipe, checkpoint, out, lambda: transformer(timestep=step, return_dict=False, **inputs)[0])
        assert (got - expected).abs().max() <= 1e-5, t
        assert (base - expected).abs().max() > 1e-3
    weights, meta = read_weights(out)
    inner = pipe.transformer.inner_dim
    fused = [k for k in weights if "single" in k and ("lora_B" in k or "lora_up" in k)]
    rows = 3 * inner + 2 * int(inner * pipe.transformer.config.mlp_ratio)  # 3 x 24 + 2 x 60 on the other klein
    assert fused and all(weights[k].shape[0] == rows for k in fused)
    if fmt == "kohya":
        assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in weights)
        assert meta["ss_base_model_version"] == "flux2_klein"


def test_simpletuner_flux2_tlora_files_load(klein_pipe, tmp_path, monkeypatch):
    """SimpleTuner's FLUX.2 T-LoRA (LyCORIS on Flux2Attention, Flux2FeedForward, Flux2ParallelSelfAttention, as its
    documentation sets) loads with tlora.load and gives LyCORIS's own output, masked as SimpleTuner masks."""
    lycoris_tlora = pytest.importorskip("lycoris.modules.tlora")
    from lycoris import LycorisNetwork, create_lycoris
    from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

    other = other_klein(klein_pipe)
    transformer = other.transformer
    monkeypatch.setattr(lycoris_tlora, "gc", SimpleNamespace(collect=lambda *a: 0))
    LycorisNetwork.apply_preset({"target_module": ["Flux2Attention", "Flux2FeedForward", "Flux2ParallelSelfAttention"]})
    torch.manual_seed(0)
    network = create_lycoris(transformer, 1.0, linear_dim=4, linear_alpha=2, algo="tlora")
    network.apply_to()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in network.loras:
            for p in (module.q_layer.weight, module.p_layer.weight, module.lambda_layer):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    config = {"algo": "tlora", "linear_dim": 4, "linear_alpha": 2, "tlora_min_rank": 2}
    path = tmp_path / "simpletuner_klein.safetensors"
    network.save_weights(str(path), torch.float32, {"lycoris_config": json.dumps(config)})
    inputs = klein_inputs(transformer, 1, 0)
    expected = {}
    with torch.no_grad():
        for t in (0, 600, 999):
            set_timestep_mask(compute_timestep_mask(t, 1000, 4, 2, 1.0))
            expected[t] = transformer(timestep=torch.tensor([t / 1000]), return_dict=False, **inputs)[0]
            clear_timestep_mask()
    network.restore()
    loaded = tlora.load(other, path)
    try:
        assert len(loaded.layers) == len(network.loras) and loaded.settings.family == "klein"
        assert any(p.endswith("to_qkv_mlp_proj") for p in loaded.layers)  # the whole fused layer, as LyCORIS has it
        with torch.no_grad():
            for t, out in expected.items():
                got = transformer(timestep=torch.tensor([t / 1000]), return_dict=False, **inputs)[0]
                assert (got - out).abs().max() <= 1e-5, t
    finally:
        tlora.unload(other)


@pytest.mark.slow
def test_the_flux_command_line_trains_klein_and_inference_samples_it(tiny_klein, image_dir, tmp_path):
    import inference
    import train

    # in this process (others trained here in fp32: accelerate keeps one precision per process); test_flux runs the
    # default bf16 in a subprocess
    assert train.main(flux_train_args(tiny_klein, image_dir, tmp_path / "out", "--mixed_precision", "no")) == 0
    (folder,) = (tmp_path / "out").iterdir()
    hp = yaml.safe_load((folder / "logs" / "hparams.yml").read_text())
    assert (hp["family"], hp["trainer_type"], hp["trainer_class"], hp["lora_rank"], hp["optimizer"]) == (
        "klein", "lora", "klein_tlora", 4, "prodigy")
    assert "--tlora" in hp["argv"] and "rank" not in hp  # no authors' FLUX.1 keys: their code cannot load FLUX.2
    weights, meta = read_weights(folder / "checkpoint-2")
    assert (meta["family"], meta["mlp_ratio"]) == ("klein", "3.0") and len(weights) == 2 * (2 * 7 + 2 * 3)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if k.endswith(".up.weight"))  # it trained
    assert inference.main(["--config_path", str(folder / "logs/hparams.yml"), "--checkpoint_idx", "2", "--prompts",
                           "a {0} riding a bike", "--num_images_per_prompt", "1", "--num_inference_steps", "2",
                           "--height", "64", "--width", "64"]) == 0
    assert (folder / "checkpoint-2/samples/ns2gs4.0/version_0/a sks riding a bike/0.png").is_file()


def test_no_authors_format_for_klein(klein_checkpoint, tmp_path, capsys):
    from tlora.interop.exporting import main

    _, checkpoint = klein_checkpoint
    out = tmp_path / "pytorch_lora_weights.safetensors"
    assert main([str(checkpoint), "--format", "authors", "--out", str(out)]) == 2 and not out.exists()
    assert "the authors released no code for it; use --format diffusers or kohya" in capsys.readouterr().err
