"""--compile (train.py, inference.py) and tlora.load(compile=True): the denoiser torch.compiled with the T-LoRA
attached. Inductor compiles C++ on the CPU (about a minute for the tiny UNet's forward and backward), so every test
here is slow; the recompile and graph-break counts need no compiler (dynamo's counting backend and explain)."""

import numpy as np
import pytest
import torch
import yaml
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import tlora
from tlora import families
from tlora.families.pipelines import load_pipeline
from tlora.generate.api import compile_denoiser
from tlora.method.settings import TLoRASettings
from tlora.train.loss_log import read_loss_log
from tlora.train.options import parse_args
from tlora.train.trainer import train

import inference
from families_case import CASES
from helpers import copy_run, read_weights, sdxl_inputs, train_args

FAMILIES = ("sdxl", "klein")  # a UNet, and a flow-matching transformer with adapters on rows of a fused layer


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from nothing and leaves dynamo's options as it found them (compile_denoiser sets one)."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        yield
    torch._dynamo.reset()


def own_pipe(request, family: str):
    """A pipeline of the family's tiny model for this test alone: compiling changes the module in place."""
    return load_pipeline(str(request.getfixturevalue(f"tiny_{family}")), "none")


def arguments(model, family: str, t: torch.Tensor, seed: int = 0) -> dict:
    """The denoiser's arguments as its pipelines pass them, at diffusion timesteps `t` (one per sample)."""
    case, name = CASES[family], families.FAMILIES[family].timestep_arg[0]
    return {name: case.timestep(t), **case.inputs(model, len(t), seed)}


def compiles(counter: CompileCounter, calls: list) -> tuple[int, int]:
    """(graphs compiled by the first call, graphs compiled by the others)."""
    before = counter.frame_count
    calls[0]()
    first = counter.frame_count - before
    for done in calls[1:]:
        done()
    return first, counter.frame_count - before - first


@pytest.mark.slow
def test_compiled_training_gives_the_eager_losses_and_checkpoint(tiny_sdxl, image_dir, tmp_path):
    runs, graphs = {}, {}
    for flags in ((), ("--compile",)):
        counters.clear()
        argv = train_args(tiny_sdxl, image_dir, tmp_path / f"out{len(flags)}", "--num_train_epochs", "4",
                          "--checkpointing_steps", "4", "--train_batch_size", "2", *flags)
        runs[flags] = train(parse_args(argv))
        graphs[flags] = counters["stats"]["unique_graphs"]
    eager, compiled = ([loss for _, loss in read_loss_log(run / "logs" / "loss.csv")] for run in runs.values())
    assert len(eager) == len(compiled) == 4
    assert torch.allclose(torch.tensor(compiled), torch.tensor(eager), rtol=0, atol=1e-5), (eager, compiled)
    assert graphs == {(): 0, ("--compile",): 1}  # 4 steps of 2 samples at their own timesteps: one graph
    eager_weights, compiled_weights = (read_weights(run / "checkpoint-4")[0] for run in runs.values())
    assert sorted(compiled_weights) == sorted(eager_weights) and not any("_orig_mod" in k for k in compiled_weights)
    assert [yaml.safe_load((run / "logs" / "hparams.yml").read_text())["compile"] for run in runs.values()] == [
        False, True]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_new_timestep_never_recompiles(request, family):
    """20 sampling calls (no gradients, CFG's batch of 2 throughout), then 20 training calls (a timestep per
    sample, backward): at most one recompile in each phase after its first call."""
    pipe = own_pipe(request, family)
    model = families.denoiser(pipe)
    counter = CompileCounter()
    compile_denoiser(tlora.attach(pipe, TLoRASettings("lora", 4, 1)), backend=counter)

    def sample(t: torch.Tensor) -> None:
        with torch.no_grad():
            model(**arguments(model, family, t.expand(2)))

    def train_step(seed: int) -> None:
        t = torch.randint(0, 1000, (2,), generator=torch.Generator().manual_seed(seed))
        model(**arguments(model, family, t, seed))[0].sum().backward()

    model.eval()
    sampling = compiles(counter, [lambda t=t: sample(t) for t in torch.linspace(999, 0, 20)])
    model.train()
    training = compiles(counter, [lambda seed=seed: train_step(seed) for seed in range(20)])
    assert sampling[0] == 1 and sampling[1] <= 1, sampling
    assert training[0] <= 1 and training[1] <= 1, training  # the first: train mode and gradients, not the timestep


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_the_tlora_adds_no_graph_break(request, family):
    pipe = own_pipe(request, family)
    model = families.denoiser(pipe)
    kwargs = arguments(model, family, torch.tensor([900, 100]))

    def breaks() -> int:
        torch._dynamo.reset()
        with torch._dynamo.config.patch(wrap_top_frame=True), torch.no_grad():  # as compile_denoiser compiles it
            return torch._dynamo.explain(model)(**kwargs).graph_break_count

    bare = breaks()
    tlora.attach(pipe, TLoRASettings("lora", 4, 1))
    assert breaks() <= bare == 0


@pytest.mark.slow
def test_scale_unload_and_a_new_tlora_after_compiling_take_effect(request):
    """Dynamo guards on the hooks once compile_denoiser has run: nothing is served from a graph traced without them."""
    unet = own_pipe(request, "sdxl").unet
    inputs, t = sdxl_inputs(unet), torch.tensor([900, 100])
    run = torch.no_grad()(lambda: unet(timestep=t, **inputs).sample)
    bare = run()
    adapters = tlora.attach(unet, TLoRASettings("lora", 4, 1))
    for p in adapters.trainable_parameters():
        torch.nn.init.normal_(p, std=0.1)
    state, expected = adapters.state_dict(), run()
    assert (expected - bare).abs().max() > 1e-2
    compile_denoiser(adapters, backend="eager")
    torch.testing.assert_close(run(), expected, rtol=0, atol=1e-5)
    adapters.set_scale(0)
    torch.testing.assert_close(run(), bare, rtol=0, atol=1e-5)
    adapters.unload()
    torch.testing.assert_close(run(), bare, rtol=0, atol=1e-5)
    tlora.attach(unet, TLoRASettings("lora", 4, 1), init=False).load_state_dict(state)
    torch.testing.assert_close(run(), expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_compiled_sampling_writes_samples_and_matches_eager(trained_run, tiny_sdxl, tmp_path):
    run = copy_run(trained_run(num_train_epochs=2, learning_rate="1e-2"), tmp_path)
    argv = ["--config_path", str(run / "logs" / "hparams.yml"), "--checkpoint_idx", "2", "--prompts",
            "a {0} on a beach", "--num_images_per_prompt", "1", "--num_inference_steps", "3", "--compile"]
    counters.clear()
    assert inference.main(argv) == 0
    assert counters["stats"]["unique_graphs"] == 1  # 3 steps of CFG's batch of 2, each its own timestep: one graph
    assert (run / "checkpoint-2" / "samples" / "ns3_gs5.0" / "version_0" / "a sks on a beach" / "0.png").is_file()

    def sample(pipe) -> np.ndarray:
        return pipe("a sks dog", num_inference_steps=3, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    eager, compiled = load_pipeline(str(tiny_sdxl), "none"), load_pipeline(str(tiny_sdxl), "none")
    tlora.load(eager, run / "checkpoint-2")
    tlora.load(compiled, run / "checkpoint-2", compile=True)
    expected, got = sample(eager), sample(compiled)
    tlora.set_scale(eager, 0)
    base = sample(eager)
    # fp32 throughout: inductor only fuses and reorders the sums (1.5e-6 apart here, pixels in 0..1, after 3 steps and
    # the VAE). The bound is the losses' 1e-5, 400 times less than a PNG level (1/255); the T-LoRA moves them 9.5e-3
    assert np.abs(got - expected).max() < 1e-5
    assert np.abs(expected - base).max() > 1e-3
