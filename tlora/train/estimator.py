"""What a training run will cost on a GPU, before renting one: `python -m tlora.estimate <train.py flags> [--json]`.

It builds the run's model empty (the `meta` device: shapes only) from its configs, a local model folder's or a
shipped architecture's (`sdxl`, `flux-dev`, `qwen-image`, ...), attaches the adapters, and runs train.py's own step on
it (`diffusion_loss`, backward, gradient clipping, the optimizer step) under `tracing.LiveBytes`,
`tracing.GPUKernels` and `tracing.Flops`. Set-up (the image and prompts encoded once, every part on the
device) is traced the same way for the VAE. What is not traced is computed from its formula and says so:
a quantized base's weights (bitsandbytes / torchao storage), 8-bit Adam's and Prodigy's state. The step time is a
model of the GPU step (`step_time`): every traced operation's FLOPs, bytes and launch, eager and compiled, as a range.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import torch
from accelerate import init_empty_weights
from torch import nn
from torch.utils.checkpoint import checkpoint

from tlora import families
from tlora.common.errors import UsageError, first_line
from tlora.common.messages import DIFFUSERS_LAYOUT
from tlora.common.text_files import read_json
from tlora.common.values import check_finite, check_seed, shown
from tlora.families.architectures import empty_pipeline, family_of, published
from tlora.families.model_checks import cached_file
from tlora.families.pipelines import DTYPES
from tlora.runs.hparams import from_hparams
from tlora.train.objective import diffusion_loss, make_optimizer
from tlora.train.options import TrainOptions
from tlora.train.step_time import GPUS, HIGH, LOW, StepOps, optimizer_kernels, step_kernels
from tlora.train.tracing import Flops, GPUKernels, LiveBytes

GB = 2**30
# Bytes per weight of a quantized Linear, with its scales: nf4 (4 bits, one fp32 absmax per 64), int8 (LLM.int8:
# one fp32 scale per row, counted per weight at in_features >= 1024 as 1 + 4 / 1024), torchao weight-only
# int8 / fp8 (one scale per output row, same bound).
QUANTIZED_BYTES = {"nf4-bnb": 0.5 + 4 / 64, "int8-bnb": 1 + 4 / 1024, "int8-torchao": 1 + 2 / 1024,
                   "fp8-torchao": 1 + 4 / 1024}


@dataclass
class Estimate:
    """One configuration's figures (GB are 2**30 bytes)."""

    model: str
    family: str
    options: dict
    peak_gb: float
    step: dict
    setup: dict
    tflops_per_step: float
    step_seconds: dict
    kernels_per_step: dict
    utilization: float | None
    traced_in_s: float
    modelled: list[str] = field(default_factory=list)
    by_formula: list[str] = field(default_factory=list)


def _gb(n: float) -> float:
    return round(n / GB, 4)


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def conditioning(family, model: nn.Module, opts: TrainOptions, dtype: torch.dtype, device: torch.device
                 ) -> dict[str, torch.Tensor]:
    """A cached batch's tensors (random): train_batch_size instance rows (and as many class rows with prior
    preservation), shaped as the family's encoders make them."""
    rows = opts.train_batch_size * (2 if opts.with_prior_preservation else 1)
    shapes = family.conditioning_shapes(model, opts.resolution, opts.max_sequence_length or 512)
    return {k: torch.full((rows, *shape[1:]), float(opts.resolution), device=device) if k == "time_ids" else
            torch.rand((rows, *shape[1:]), device=device, dtype=dtype) for k, shape in shapes.items()}


def _optimizer_state(opts: TrainOptions, numels: list[int]) -> tuple[int, str] | None:
    """Optimizer state bytes by formula where its kernels cannot run on meta (None: AdamW, traced)."""
    if opts.optimizer == "prodigy":  # exp_avg, exp_avg_sq, s, p0: four float32 copies of each parameter
        return 16 * sum(numels), "Prodigy state: 4 float32 copies of the adapters"
    if opts.use_8bit_adam:  # bitsandbytes blockwise 8-bit: two uint8 states, one fp32 absmax per 256; < 4096: fp32
        total = sum(n * (2 * (1 + 4 / 256) if n >= 4096 else 8) for n in numels)
        return int(total), "8-bit AdamW state: 2 bytes per value and an absmax per 256 (bitsandbytes' layout)"
    return None


def _base_weights(model: nn.Module, adapters: set[int]) -> list[torch.Tensor]:
    """The denoiser's own Linear weights: what a quantized base stores differently."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in adapters]


def _linear_weights(model: nn.Module, adapters: set[int]) -> dict:
    """The base's Linear weights: count, numel, bytes, largest bytes."""
    weights = _base_weights(model, adapters)
    return {"count": len(weights), "numel": sum(w.numel() for w in weights),
            "bytes": sum(w.numel() * w.element_size() for w in weights),
            "largest": max(w.numel() * w.element_size() for w in weights)}


def trace_step(opts: TrainOptions, name: str | None = None, pipe=None) -> dict:
    """Build the run's model on meta and trace set-up and one steady-state training step with AdamW and the base
    unquantized (`estimate` applies those options by formula). With `pipe` (loaded, on the CPU) the same step runs
    for real instead, with torch's own CPU kernels and autocast, and is tracked the same way (no set-up)."""
    dtype = DTYPES[opts.mixed_precision]
    real = pipe is not None
    pipe = pipe if real else _empty_pipeline(name, dtype, opts)
    family = opts.recipe
    if not family.owns(family.model(pipe)):
        raise UsageError(f"--pretrained_model_name_or_path {name} is not a {family.name} model, but the options are "
                         f"{family.name}'s; pass the options of its family")
    model = family.model(pipe)
    if not real:
        family.prepare(pipe, dtype)  # as loading does (SDXL: a VAE that needs fp32 stays fp32 under fp16)
    scheduler = family.noise_scheduler(pipe)
    parts = {k: v for k, v in (pipe.components if real else vars(pipe)).items() if isinstance(v, nn.Module)}
    out: dict = {} if real else {"setup": _trace_setup(family, pipe, parts, opts)}
    autocast = dtype if opts.mixed_precision != "no" else None
    tlora, optimizer = _train_state(family, opts, model, scheduler, autocast, real)
    params = tlora.trainable_parameters()
    batch = conditioning(family, model, opts, dtype, torch.device("cpu" if real else "meta"))
    live = _tracked(parts, family.encoders(pipe), tlora, optimizer, batch)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: live.recategorize(p.grad, "gradients")) for p in params]
    live.reset_peak()
    counter = Flops()
    kernels = torch.autocast("cpu", dtype, enabled=autocast is not None) if real else GPUKernels(autocast)
    in_adapters = {id(m) for a in tlora.adapters.values() for m in a.modules()}
    ops = StepOps(_base_weights(model, in_adapters), opts.allow_tf32)
    hooks += [model.register_forward_pre_hook(lambda *_: setattr(ops, "phase", "compiled")),
              model.register_forward_hook(lambda *_: setattr(ops, "phase", "eager"))]
    start = time.perf_counter()
    try:
        with live, kernels, counter, ops:
            loss = diffusion_loss(family, model, pipe, scheduler, batch, dtype, opts.prior_loss_weight
                                  if opts.with_prior_preservation else None, opts.guidance_scale or 1.0)
            ops.phase = "compiled"  # the backward of the compiled denoiser (and of the loss: a few operations)
            loss.backward()
            ops.phase = "optimizer"
            if opts.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
        linears = _linear_weights(model, in_adapters)
        adapters = len(tlora.adapters)
        if real:  # leave the pipeline as it was
            tlora.unload()
            model.disable_gradient_checkpointing()
    out.update(split=dict(live.at_peak), flops=counter.total, traced_in_s=time.perf_counter() - start,
               conv_flops=counter.convolution, ops=ops.ops,
               adapters=adapters, numels=[p.numel() for p in params], linears=linears)
    return out


def _empty_pipeline(name: str, dtype: torch.dtype, opts: TrainOptions):
    """The run's pipeline built empty; a model folder whose configs do not build one of its family's pipelines
    (a class that does not exist, a value a class refuses, a denoiser of another kind) is one line naming it."""
    if name in published():
        return empty_pipeline(name, dtype)
    try:
        pipe = empty_pipeline(name, dtype)
        family = opts.recipe
        family.conditioning_shapes(family.model(pipe), opts.resolution, opts.max_sequence_length or 512)
        family.encoders(pipe)
        return pipe
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - the folder's configs are the user's input
        raise UsageError(f"--pretrained_model_name_or_path: the configs in {name} do not build its {opts.family} "
                         f"pipeline ({first_line(err)}); {DIFFUSERS_LAYOUT}, or one of "
                         f"{', '.join(published())}") from None


def _train_state(family, opts: TrainOptions, model: nn.Module, scheduler, autocast: torch.dtype | None, real: bool):
    """The adapters (no random start: the values do not matter here), gradient checkpointing as train.py sets it,
    and AdamW after one step (its moments exist in the steady state)."""
    settings = replace(from_hparams(vars(opts), "train.py"),
                       num_train_timesteps=scheduler.config.num_train_timesteps)
    with nullcontext() if real else init_empty_weights(include_buffers=False):
        tlora = family.attach(model, settings, init=False)
    params = tlora.trainable_parameters()
    if opts.gradient_checkpointing:  # diffusers' own; on meta with the kernels' mode in the recomputation too
        model.enable_gradient_checkpointing(None if real else partial(_checkpoint, autocast=autocast))
    model.train()
    optimizer = make_optimizer(replace(opts, optimizer="adamw", use_8bit_adam=False), params)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return tlora, optimizer


def _tracked(parts: dict[str, nn.Module], encoders: list, tlora, optimizer, batch: dict) -> LiveBytes:
    """A LiveBytes counting what is on the device when a step starts: every part but the encoders (offloaded once
    the conditioning is cached), the adapters, the optimizer state and the batch."""
    live = LiveBytes()
    offloaded = {id(t) for e in encoders if e is not None for t in (*e.parameters(), *e.buffers())}
    adapter_tensors = {id(t) for a in tlora.adapters.values() for t in (*a.parameters(), *a.buffers())}
    for part in parts.values():
        for t in (*part.parameters(), *part.buffers()):
            if id(t) not in offloaded:
                live.track(t, "adapters" if id(t) in adapter_tensors else "weights")
    for state in optimizer.state.values():
        for t in state.values():
            if torch.is_tensor(t) and t.numel() > 1:
                live.track(t, "optimizer")
    for t in batch.values():
        live.track(t, "activations")
    return live


def _checkpoint(module: nn.Module, *args, autocast: torch.dtype | None):
    """diffusers' gradient checkpointing (non-reentrant torch.utils.checkpoint); the recomputation in backward
    runs outside the forward's function modes, so GPUKernels is entered there again."""
    return checkpoint(module.__call__, *args, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), GPUKernels(autocast)))


def _trace_setup(family, pipe, parts: dict[str, nn.Module], opts: TrainOptions) -> dict:
    """Set-up as train.py does it: every part on the device, then the image encoded once at the resolution."""
    weights = sum(_bytes(p) for p in parts.values())
    pixels = torch.empty(1, 3, opts.resolution, opts.resolution, device="meta", dtype=pipe.vae.dtype)
    live = LiveBytes()
    with torch.no_grad(), live, GPUKernels(None):
        family.encode_pixels(pipe, pixels, opts.resolution, opts.resolution, torch.device("meta"))
    encoders = sum(_bytes(part) for part in family.encoders(pipe) if part is not None)
    return {"weights": weights, "encode": live.peak, "encoders": encoders}


def _step_seconds(t: dict, opts: TrainOptions, utilization: float | None) -> tuple[dict, dict]:
    """Seconds per step on each GPU, eager and compiled, as [low, high] (step_time's LOW and HIGH assumptions,
    `utilization` the compute share of both ends if given); and the kernels per step."""
    quantized = QUANTIZED_BYTES.get(opts.base_model_precision)
    steps = {}
    for mode in ("eager", "compiled"):
        steps[mode] = step_kernels(t["ops"], mode == "compiled", quantized)
        optimizer_kernels(steps[mode], opts.optimizer, opts.use_8bit_adam, t["numels"], bool(opts.max_grad_norm))
    ends = [replace(a, compute_share=utilization) if utilization else a for a in (LOW, HIGH)]
    seconds = {gpu: {mode: [round(k.seconds(spec, a), 3) for a in ends] for mode, k in steps.items()}
               for gpu, spec in GPUS.items()}
    return seconds, {mode: len(k.flops) for mode, k in steps.items()}


def estimate(opts: TrainOptions, name: str, utilization: float | None = None, traced: dict | None = None) -> Estimate:
    """The figures of one configuration (`traced`: a trace_step result to reuse for options it does not change)."""
    t = traced or trace_step(opts, name)
    split = dict(t["split"])
    modelled = ["attention: CUDA's flash (half precision) / memory-efficient (fp32) kernels, not the math path",
                "autocast: CUDA autocast's op lists, applied on meta" if opts.mixed_precision != "no" else
                "fp32: no autocast",
                "the text encoders' activations while encoding prompts (under 0.1 GB at 77 / 512 tokens) are not "
                "counted",
                "peak = bytes of live tensors (torch.cuda.max_memory_allocated); the CUDA context and the caching "
                "allocator's reserve (about 0.5-1 GB) come on top"]
    by_formula = []
    if (state := _optimizer_state(opts, t["numels"])) is not None:
        split["optimizer"], note = state
        by_formula.append(note)
    weights_setup = t["setup"]["weights"]
    if opts.base_model_precision not in (None, "auto"):
        lin = t["linears"]
        saved = lin["bytes"] - int(lin["numel"] * QUANTIZED_BYTES[opts.base_model_precision])
        split["weights"] -= saved
        split["activations"] += lin["largest"]  # one Linear's weight unpacked to the compute dtype at a time
        weights_setup -= saved
        by_formula.append(f"--base_model_precision {opts.base_model_precision}: the denoiser's {lin['count']} Linear "
                          f"weights at {QUANTIZED_BYTES[opts.base_model_precision]:.3f} bytes each, plus the largest "
                          f"unpacked ({_gb(lin['largest'])} GB); activations and FLOPs as the unquantized model's")
    step_peak = sum(split.values())
    setup_peak = weights_setup + t["setup"]["encode"]
    step = {k: _gb(v) for k, v in split.items()} | {"peak_gb": _gb(step_peak)}
    step["adapters_grads_optimizer_gb"] = _gb(split["adapters"] + split["gradients"] + split["optimizer"])
    by_formula.append("step time: per kernel max(FLOPs / peak, bytes / bandwidth) + launch cost, eager and compiled "
                      "(tlora/train/step_time.py); clipping and the optimizer step as CUDA runs them")
    seconds, launches = _step_seconds(t, opts, utilization)
    return Estimate(
        model=name, family=opts.family, peak_gb=_gb(max(step_peak, setup_peak)), step=step,
        setup={"peak_gb": _gb(setup_peak), "weights_gb": _gb(weights_setup), "encode_gb": _gb(t["setup"]["encode"]),
               "encoders_gb": _gb(t["setup"]["encoders"])},
        tflops_per_step=round(t["flops"] / 1e12, 6), step_seconds=seconds, kernels_per_step=launches,
        utilization=utilization, traced_in_s=round(t["traced_in_s"], 1), modelled=modelled, by_formula=by_formula,
        options={k: getattr(opts, k) for k in ("resolution", "train_batch_size", "trainer_type", "lora_rank",
                                               "min_rank", "mixed_precision", "gradient_checkpointing",
                                               "use_8bit_adam", "optimizer", "base_model_precision",
                                               "with_prior_preservation")} | {"adapters": t["adapters"]},
    )


# -- the command ------------------------------------------------------------------------------------------
CONTEXT_GB = 0.75  # the CUDA context and allocator reserve that --fit adds to the traced peak
MIN_UTILIZATION = 1e-6  # below it (down to the smallest float) a step's seconds would overflow
NOT_READ = "(not read by the estimate)"


def parse_args(argv: list[str] | None = None) -> tuple[TrainOptions, dict]:
    """train.py's flags (files it would read are not needed) and the estimate's own: --json, --fit, --utilization."""
    from tlora.train import checks
    from tlora.train.options import build_parser, read_flags, resolve_family

    parser = build_parser()
    parser.description = "Estimate a training run's peak GPU memory, FLOPs and step time: train.py's flags, plus:"
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    parser.add_argument("--fit", type=float, default=None,
                        help="GB of GPU memory: also name the fastest options that fit in it.")
    parser.add_argument("--utilization", "--utilisation", type=float, default=None,
                        help="Share of the dense peak TFLOP/s that matrix products, convolutions and attention reach, "
                             f"at both ends of the step-time range. Default: {LOW.compute_share} at the low end, "
                             f"{HIGH.compute_share} at the high end.")
    extra: dict = {}
    opts = read_flags(parser, argv, extra)
    if extra["utilization"] is not None:
        check_finite("--utilization", extra["utilization"], 0, 1, low_open=True)
        if extra["utilization"] < MIN_UTILIZATION:  # the step time would overflow to infinity
            raise UsageError(f"--utilization {extra['utilization']} is too small a share to give a step time; pass "
                             f"a share of at least {MIN_UTILIZATION}, such as 0.6")
    if extra["fit"] is not None:
        check_finite("--fit", extra["fit"], 0, low_open=True)
    check_seed("--seed", opts.seed)
    name = opts.pretrained_model_name_or_path
    if not name:
        raise UsageError("--pretrained_model_name_or_path is required; pass a model folder, or one of "
                         f"{', '.join(published())}")
    if name not in published():
        check_model_folder(name, opts.revision)
    opts.train_data_dir = opts.train_data_dir or NOT_READ
    opts.output_dir = opts.output_dir or NOT_READ
    opts.class_name = opts.class_name or "dog"
    resolve_family(opts, family_of(name))
    opts.placeholder_token = opts.placeholder_token or "sks"
    opts.trainer_type = opts.trainer_type or "ortho_lora"
    opts.trainer_class = opts.trainer_class or f"{opts.family}_tlora"  # the mask costs nothing either way
    checks.validate(opts)
    return opts, extra


def _config_name(part: str) -> str:
    return f"{part}/{'scheduler_config.json' if part == 'scheduler' else 'config.json'}"


def check_model_folder(name: str, revision: str | None = None) -> None:
    """A model's configs as the estimate reads them, from a local folder or (a hub id) the Hugging Face cache:
    model_index.json, and the config of every part it names and of the parts its family's estimate builds (the
    denoiser, VAE, text encoders and scheduler), are UTF-8 JSON objects. One line naming the file otherwise. A hub
    id not cached yet is checked once its configs are downloaded (`run`)."""
    flag = "--pretrained_model_name_or_path"
    fix = f"{DIFFUSERS_LAYOUT}, or one of {', '.join(published())}"
    index_path = cached_file(name, "model_index.json", revision)
    if index_path is None:
        return  # no folder there, or not cached: resolving the family says so in its own line
    index = read_json(index_path, flag, fix)
    family_name = families.PIPELINES.get(index.get("_class_name"))
    if family_name is None:
        return  # families.detect names the class and what is trained
    family = families.get(family_name)
    signature = inspect.signature(family.pipeline_class.__init__).parameters
    needed = [family.model_attr, "vae", "scheduler", *(p for p in signature if p.startswith("text_encoder"))]
    for part, spec in index.items():
        if part.startswith("_"):
            continue
        config = cached_file(name, _config_name(part), revision)
        if isinstance(spec, list) and len(spec) == 2 and all(isinstance(x, str) for x in spec):
            if config is not None:
                read_json(config, flag, fix)
        elif part in needed or (config is not None and spec != [None, None]):
            raise UsageError(f"{flag}: {index_path} gives {part} as {shown(spec)}, not [library, class]; {fix}")
        if part in needed and spec[0] not in ("diffusers", "transformers"):
            raise UsageError(f"{flag}: {index_path} gives {part} as {shown(spec)}, a class of neither diffusers nor "
                             f"transformers; {fix}")
    for part in needed:
        if part not in index or cached_file(name, _config_name(part), revision) is None:
            raise UsageError(f"{flag}: {name} has no {_config_name(part)} (or model_index.json does not name "
                             f"{part}), which its {family.name} pipeline needs; {fix}")


def model_source(name: str, revision: str | None) -> str:
    """A shipped architecture's name or a local folder as it is; a hub model's configs (JSON files only)."""
    from pathlib import Path

    if name in published():
        return name
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(name, revision=revision, allow_patterns=["*.json"])
    except Exception as err:  # noqa: BLE001 - no network, no access, no such repository
        raise UsageError(f"--pretrained_model_name_or_path {name}: its configs could not be read ({first_line(err)}); "
                         f"pass a model folder or one of {', '.join(published())}") from None
    check_model_folder(folder)
    return folder


def fit(opts: TrainOptions, name: str, budget_gb: float, utilization: float | None, traced: dict) -> dict:
    """The options to add, cheapest in time first (bf16, gradient checkpointing, 8-bit Adam, a 4-bit base), until
    the run fits `budget_gb` with the CUDA context: the flags to add and the figures then (fits false: even all
    of them are not enough)."""
    steps = []
    if opts.mixed_precision == "no":
        steps.append(("--mixed_precision bf16", {"mixed_precision": "bf16"}))
    steps.append(("--gradient_checkpointing", {"gradient_checkpointing": True}))
    if opts.optimizer == "adamw":
        steps.append(("--use_8bit_adam", {"use_8bit_adam": True}))
    if opts.recipe.fit_by_quantizing and opts.base_model_precision in (None, "auto"):
        steps.append(("--base_model_precision nf4-bnb", {"base_model_precision": "nf4-bnb"}))
    changes, current = [], opts
    result = estimate(opts, name, utilization, traced)
    traces = {(opts.mixed_precision, opts.gradient_checkpointing): traced}
    for flag, change in steps:
        if result.peak_gb + CONTEXT_GB <= budget_gb:
            break
        current = replace(current, **change)
        key = (current.mixed_precision, current.gradient_checkpointing)
        if key not in traces:  # 8-bit Adam and a quantized base change the figures by formula only
            traces[key] = trace_step(current, name)
        result = estimate(current, name, utilization, traces[key])
        changes.append(flag)
    fits = result.peak_gb + CONTEXT_GB <= budget_gb
    out = {"fits": fits, "budget_gb": budget_gb, "add": changes, "peak_gb": result.peak_gb,
           "step_seconds": result.step_seconds}
    if not fits and result.setup["peak_gb"] >= result.step["peak_gb"]:  # the encoders, which no option here moves
        setup = result.setup
        out["why"] = (f"set-up holds every part on the device while the prompts and the image are encoded "
                      f"({setup['peak_gb']:.1f} GB, the text and image encoders {setup['encoders_gb']:.1f} GB of it), "
                      f"which no option lowers; use a GPU with at least {math.ceil(setup['peak_gb'] + CONTEXT_GB)} GB")
    return out


def table(e: Estimate) -> str:
    s, o = e.step, e.options
    lines = [
        f"{e.model} ({e.family}), {o['resolution']} px, batch {o['train_batch_size']}, {o['trainer_type']} rank "
        f"{o['lora_rank']}/{o['min_rank']} ({o['adapters']} adapters), {o['mixed_precision']}, gradient "
        f"checkpointing {'on' if o['gradient_checkpointing'] else 'off'}, {o['optimizer']}"
        f"{' 8-bit' if o['use_8bit_adam'] else ''}, base {o['base_model_precision'] or 'auto'}",
        "",
        "| GPU memory (GB) | |",
        "|---|---|",
        f"| **peak** | **{e.peak_gb:.2f}** |",
        f"| training step: weights | {s['weights']:.2f} |",
        f"| training step: adapters + gradients + optimizer state | {s['adapters_grads_optimizer_gb']:.2f} "
        f"({s['adapters']:.2f} + {s['gradients']:.2f} + {s['optimizer']:.2f}) |",
        f"| training step: activations | {s['activations']:.2f} |",
        f"| training step: peak | {s['peak_gb']:.2f} |",
        f"| set-up: every part on the device + encoding the image | {e.setup['peak_gb']:.2f} "
        f"({e.setup['weights_gb']:.2f} + {e.setup['encode_gb']:.2f}) |",
        "",
        *time_table(e),
        "",
        f"{e.tflops_per_step:.2f} TFLOPs, {e.kernels_per_step['eager']} kernels eager and "
        f"{e.kernels_per_step['compiled']} compiled per step (traced on the meta device in {e.traced_in_s:.1f} s)",
        "",
        "modelled: " + "; ".join(e.modelled),
        "by formula: " + "; ".join(e.by_formula),
    ]
    return "\n".join(lines)


def time_table(e: Estimate) -> list[str]:
    """Seconds per step, eager and torch.compile side by side, each a range from the low-end to the high-end
    assumptions (step_time.LOW, HIGH), which the last line states."""
    lines = ["| s/step, low-high | eager | torch.compile |", "|---|---|---|"]
    for gpu, modes in e.step_seconds.items():
        lines.append(f"| {gpu} | " + " | ".join(f"{low:.2f}-{high:.2f}" for low, high in modes.values()) + " |")
    low, high = (f"{e.utilization or a.compute_share:.0%} of the dense peak, {a.bandwidth_share:.0%} of the memory "
                 f"bandwidth, launches of {a.eager_launch_us:g} us eager / {a.compiled_launch_us:g} us compiled"
                 for a in (LOW, HIGH))
    return [*lines, "", f"low: {low}, overlapping the GPU's work; high: {high}, after it"]


def run(parsed: tuple[TrainOptions, dict]) -> None:
    opts, extra = parsed
    name = model_source(opts.pretrained_model_name_or_path, opts.revision)
    traced = trace_step(opts, name)
    result = estimate(opts, name, extra["utilization"], traced)
    result.model = opts.pretrained_model_name_or_path  # as given (`name` may be a download folder)
    out = asdict(result)
    if extra["fit"] is not None:
        out["fit"] = fit(opts, name, extra["fit"], extra["utilization"], traced)
    if extra["json"]:
        print(json.dumps(out))
        return
    print(table(result))
    if "fit" in out:
        f = out["fit"]
        verdict = "fits" if f["fits"] else "does not fit even"
        print(f"\n--fit {f['budget_gb']:g}: {verdict} with {' '.join(f['add']) or 'the options as given'} "
              f"(peak {f['peak_gb']:.2f} GB + {CONTEXT_GB} GB CUDA context; H100 "
              + ", ".join(f"{mode} {low:.2f}-{high:.2f}" for mode, (low, high) in f["step_seconds"]["H100"].items())
              + " s/step)")
        if "why" in f:
            print(f"--fit {f['budget_gb']:g}: {f['why']}")


def main(argv: list[str] | None = None) -> int:
    from tlora.common.commands import run_command

    return run_command(parse_args, run, None, argv)


if __name__ == "__main__":
    sys.exit(main())
