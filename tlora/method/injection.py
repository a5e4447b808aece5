"""Attaching T-LoRA adapters to a diffusers denoiser (a UNet or a transformer) without touching its modules or
attention processors. Which Linears, and how the timestep reaches the paper's t, the caller says (DenoiserSpec).

Each adapted projection Linear (DenoiserSpec.layers) gets the adapter as a
submodule (`timestep_adapter`, so that `.to()`, DDP and optimizers see it) and a forward hook that adds the
adapter's output. Nothing is replaced, so SDPA, flash or xformers processors keep running, and other LoRAs
loaded with diffusers/peft (before or after; their layers wrap the Linear as `base_layer`) apply alongside
and unload on their own. A forward pre-hook on the denoiser reads the timestep it is called with, turns it
into T-LoRA's t (DenoiserSpec.paper_t) and sets the rank mask for that call, so any pipeline and any scheduler
gets the right mask at every step, per sample. A denoiser made of models called one at a time (DenoiserSpec.entries:
Wan 2.2's two experts) has that hook, and a mask of its own, on each of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from tlora.common.errors import UsageError
from tlora.common.messages import ALREADY_ATTACHED
from tlora.method.adapters import (
    Branch,
    FrozenCast,
    Masks,
    OrthoLoRAAdapter,
    apply,
    as_saved,
    draw_base,
    make_adapter,
    negated_branch,
    orthogonal_starts,
)
from tlora.method.denoiser import DenoiserSpec
from tlora.method.settings import TLoRASettings


@dataclass
class MaskState:
    """What every adapter of one denoiser shares: the settings, the current rank mask and the adapters' output
    multiplier (`scale`, TLoRA.set_scale)."""

    settings: TLoRASettings
    scale: float = 1.0
    mask: torch.Tensor | None = field(default=None, repr=False)
    active: torch.Tensor | None = field(default=None, repr=False)  # what the adapters get: mask, maybe cut short
    masks: Masks | None = field(default=None, repr=False)  # `active`, cast once per dtype for all adapters

    def set_timestep(self, timestep: torch.Tensor | float, device: torch.device) -> None:
        """Set the mask for a denoiser call at `timestep` (scalar or one per sample); no host sync. On the CPU the
        adapters get it as far as the largest active rank (`active`), so that they compute only active components."""
        s = self.settings
        if not s.timestep_dependent:  # every component at every t: no mask to multiply by
            self.mask = self.active = self.masks = None
            return
        self.mask = s.mask(torch.as_tensor(timestep, device=device)).reshape(-1, s.lora_rank)
        self.active = self.mask
        if self.mask.device.type == "cpu" and not torch.compiler.is_compiling():  # no device sync here; a compiled
            self.active = self.mask[:, :int(self.mask.sum(dim=1).max())]  # graph keeps the full width (no recompiles)
        self.masks = Masks(self.active)


ADAPTER = "timestep_adapter"  # the adapter's name on its Linear; no "lora" in it, so peft never takes it for its own
FUSED = ("this model's attention projections are fused (fuse_qkv_projections): the fused layer bypasses the "
         "T-LoRA on to_q/to_k/to_v; call unfuse_qkv_projections() to use the T-LoRA")
OFFLOADED = ("the T-LoRA's adapters are offloaded layer by layer (enable_sequential_cpu_offload), which they do not "
             "support; use enable_model_cpu_offload() or keep the model on one device")


def base_linear(module: nn.Module) -> nn.Linear:
    """The nn.Linear that computes a projection: the module itself, or the base layer of a peft LoRA layer."""
    while hasattr(module, "get_base_layer") and module.get_base_layer() is not module:
        module = module.get_base_layer()
    if not isinstance(module, nn.Linear):
        raise ValueError(f"expected a Linear attention projection, found {type(module).__name__}")
    return module


def attention_of(model: nn.Module, path: str) -> nn.Module | None:
    """The attention module (one that can fuse its projections) holding the Linear at `path`, if any."""
    parts = path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        module = model.get_submodule(".".join(parts[:end]))
        if hasattr(module, "fuse_projections"):
            return module
    return None


class RowAdapters(nn.Module):
    """Several adapters on one fused Linear, each adapting its own rows of the output (FLUX.2's q, k, v inside
    `to_qkv_mlp_proj`). Adapters of one kind and rank on adjacent rows run stacked, as one adapter would: one
    down-projection, one gate, one batched up-projection and one add into their rows (bits may differ from running
    them one by one: other GEMM shapes); the rows none adapts (FLUX.2's MLP rows) are never touched."""

    def __init__(self, out_features: int, parts: dict[str, tuple[tuple[int, int], nn.Module]]) -> None:
        super().__init__()
        ordered = sorted(parts.items(), key=lambda item: item[1][0])
        self.out_features = out_features
        self.prefixes = [prefix for prefix, _ in ordered]
        self.rows = [rows for _, (rows, _) in ordered]
        self.parts = nn.ModuleList(adapter for _, (_, adapter) in ordered)
        ends = [0] + [stop for _, stop in self.rows]
        if any(start < end for (start, _), end in zip(self.rows, ends)) or ends[-1] > out_features:
            raise ValueError(f"adapter rows {self.rows} overlap or exceed the layer's {out_features} outputs")
        widths = {stop - start for start, stop in self.rows}
        self.stacked = (len({type(a) for a in self.parts}) == 1 and len({a.rank for a in self.parts}) == 1
                        and len(widths) == 1 and all(b[0] == a[1] for a, b in zip(self.rows, self.rows[1:])))
        self._frozen = FrozenCast()

    def part(self, prefix: str) -> nn.Module:
        return self.parts[self.prefixes.index(prefix)]

    def _apply(self, fn, recurse: bool = True):
        self._frozen = FrozenCast()  # moved or converted: the cast is made again where the factors are
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The update alone, the full width of the layer (zeros where no adapter is): for reading it, not the step."""
        return self.add_to(x.new_zeros(*x.shape[:-1], self.out_features), x, mask)

    def add_to(self, output: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | Masks | None, scale: float = 1.0
               ) -> torch.Tensor:
        """`output` + scale * the update, added into `output` itself (its rows of each adapter only). An output that
        is a view (bitsandbytes' int8 Linear returns one made inside its autograd Function, which autograd allows no
        in-place change of) is copied first."""
        compiling = torch.compiler.is_compiling()  # dynamo traces neither _is_view nor mark_dirty; in its graph
        if not compiling and output._is_view() and torch.is_grad_enabled():  # the adds below are functional
            output = output.clone()
        if self.stacked:
            spans = [(self.rows[0][0], self.rows[-1][1], len(self.parts))]
            deltas = [apply(self._branches(), x, mask, output.dtype, self._frozen_branches
                            if isinstance(self.parts[0], OrthoLoRAAdapter) else None)]
        else:
            spans = [(start, stop, 1) for start, stop in self.rows]
            deltas = [adapter(x, mask, output.dtype) for adapter in self.parts]
        deltas = [d if scale == 1 else scale * d for d in deltas]
        if compiling:
            for span, delta in zip(spans, deltas):
                _rows_of(output, span).add_(delta)
            return output
        return _AddIntoRows.apply(output, spans, *deltas)

    def _branches(self) -> list[Branch]:
        """The parts' trained branches as one: downs side by side (groups*r x in), lambdas (groups x r), ups stacked
        (groups x out x r)."""
        parts = [adapter.branches()[0] for adapter in self.parts]
        lam = None if parts[0].lam is None else torch.cat([p.lam for p in parts])
        return [Branch(torch.cat([p.down for p in parts]), lam, torch.stack([p.up for p in parts]), 1)]

    def _frozen_branches(self, dtype: torch.dtype) -> list[Branch]:
        sources = tuple(t for a in self.parts for t in (a.base_q.weight, a.base_lambda, a.base_p.weight))
        return self._frozen.get(sources, dtype, _stacked_negated)


def _stacked_negated(dtype: torch.dtype, *sources: torch.Tensor) -> list[Branch]:
    """The parts' frozen branches as one, subtracted (-lambda0), in `dtype`: sources are (Q0, lambda0, P0) per part."""
    qs, lams, ps = sources[0::3], sources[1::3], sources[2::3]
    return negated_branch(dtype, torch.cat(qs), torch.cat(lams), torch.stack(ps))


def _rows_of(t: torch.Tensor, span: tuple[int, int, int]) -> torch.Tensor:
    """t's columns start:stop as a delta holds them: (*lead, width), or (groups, *lead, width / groups) for stacked
    adapters (a view either way)."""
    start, stop, groups = span
    rows = t[..., start:stop]
    return rows if groups == 1 else rows.unflatten(-1, (groups, -1)).movedim(-2, 0)


class _AddIntoRows(torch.autograd.Function):
    """output with deltas[i] added, in place, into its columns spans[i]: no zero blocks and no copy of the rows
    none adapts; backward hands each delta its columns of the gradient and the output the gradient itself, as views
    (a slice's own backward would allocate a zero-filled gradient of the whole width for each)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, spans: list[tuple[int, int, int]], *deltas: torch.Tensor) -> torch.Tensor:
        ctx.spans, ctx.dtypes = spans, [d.dtype for d in deltas]
        ctx.mark_dirty(output)
        for span, delta in zip(spans, deltas):
            _rows_of(output, span).add_(delta)
        return output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad, None, *(_rows_of(grad, span).to(dtype) for span, dtype in zip(ctx.spans, ctx.dtypes)))


class _AddAdapter:
    """Forward hook of a projection Linear: output + scale * adapter(input, mask), the update in the output's dtype
    (as peft adds its LoRA: the layer keeps its output dtype under autocast)."""

    def __init__(self, state: MaskState) -> None:
        self.state = state

    def __call__(self, linear: nn.Linear, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        scale = self.state.scale
        if scale == 0:
            return output
        adapter = getattr(linear, ADAPTER)
        if isinstance(adapter, RowAdapters):
            return adapter.add_to(output, inputs[0], self.state.masks, scale)
        delta = adapter(inputs[0], self.state.masks, output.dtype)
        return output + delta if scale == 1 else output + scale * delta


class TLoRA:
    """The adapters attached to one denoiser: their settings, parameters, checkpoint keys, scale, and `unload()`."""

    def __init__(self, denoiser: nn.Module, state: MaskState, layers: dict[str, tuple[str, nn.Linear]],
                 spec: DenoiserSpec) -> None:
        self.denoiser, self.state, self.layers, self.spec = denoiser, state, layers, spec
        self._trainable: list[nn.Parameter] | None = None
        found = (attention_of(denoiser, path) for path, _ in layers.values())
        self._attentions = list({id(a): a for a in found if a is not None}.values())
        self.check_usable()
        self._fused_since_check = False
        # a mask per entry, which its own calls set: gradient checkpointing recomputes an entry's layers in backward,
        # after the other entries' calls, with that entry's mask
        self.states = {entry: state if i == 0 else MaskState(state.settings) for i, entry in enumerate(spec.entries)}
        paths = {id(linear): path for path, linear in layers.values()}
        adds = {entry: _AddAdapter(s) for entry, s in self.states.items()}
        under = {id(linear): adds[entry_of(paths[id(linear)], spec.entries)] for linear in self.linears}
        self._hooks = [denoiser.get_submodule(entry).register_forward_pre_hook(partial(self._on_denoiser_call, s),
                                                                               with_kwargs=True)
                       for entry, s in self.states.items()]
        self._layer_hooks = [linear.register_forward_hook(under[id(linear)]) for linear in self.linears]
        self._watch_fusing()
        denoiser._tlora = self

    @property
    def settings(self) -> TLoRASettings:
        return self.state.settings

    @property
    def linears(self) -> list[nn.Linear]:
        """The adapted Linears, each once (the adapters of a fused layer share one)."""
        return list({id(linear): linear for _, linear in self.layers.values()}.values())

    def check_usable(self) -> None:
        """Refuse, in one line, a model state in which part of the T-LoRA would silently not apply."""
        if any(self.spec.fused(a) for a in self._attentions):
            raise UsageError(FUSED)
        self._check_offload()

    def _check_offload(self) -> None:
        """enable_sequential_cpu_offload puts its hooks on every module: the first adapter's tell."""
        first = next(iter(self.layers.values()))[1]
        adapter = getattr(first, ADAPTER, first)
        if any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in adapter.modules()):
            raise UsageError(OFFLOADED)

    def _watch_fusing(self) -> None:
        """Fusing is checked when it happens: each adapted attention's `fuse_projections` (which diffusers'
        fuse_qkv_projections calls) marks the T-LoRA for a check at the next denoiser call; no call scans otherwise."""
        self._unwatched = [(a, a.__dict__.get("fuse_projections")) for a in self._attentions]
        for attention in self._attentions:
            attention.fuse_projections = _FuseWatch(self, attention.fuse_projections)

    def _check_at_call(self) -> None:
        """check_usable in O(1) at each call: the attentions are scanned only after a fusing (and at every call
        until the model is unfused)."""
        if self._fused_since_check:
            self.check_usable()
            self._fused_since_check = False
        else:
            self._check_offload()

    def _on_denoiser_call(self, state: MaskState, denoiser: nn.Module, args: tuple, kwargs: dict) -> None:
        self._check_at_call()
        name, position = self.spec.timestep_arg
        timestep = kwargs[name] if name in kwargs else args[position]
        device = timestep.device if torch.is_tensor(timestep) else next(iter(self.layers.values()))[1].weight.device
        state.set_timestep(self.spec.paper_t(torch.as_tensor(timestep, device=device)), device)

    @property
    def adapters(self) -> dict[str, nn.Module]:
        """Checkpoint key prefix (e.g. `mid_block....attn1.processor.to_q_lora`) -> adapter."""
        out = {}
        for prefix, (_, linear) in self.layers.items():
            adapter = getattr(linear, ADAPTER)
            out[prefix] = adapter.part(prefix) if isinstance(adapter, RowAdapters) else adapter
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapters' trainable parameters, listed once (the optimizer and clipping take the same list)."""
        if self._trainable is None:
            self._trainable = [p for a in self.adapters.values() for p in a.parameters() if p.requires_grad]
        return self._trainable

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The authors' checkpoint layout: `<prefix>.<param>`, float32, contiguous, on the CPU."""
        return as_saved({f"{prefix}.{name}": tensor for prefix, adapter in self.adapters.items()
                         for name, tensor in adapter.state_dict().items()})

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint's tensors; fails naming the first missing, extra or mis-shaped key."""
        check_keys({k: v.shape for k, v in self.state_dict().items()}, state_dict)
        for prefix, adapter in self.adapters.items():
            adapter.load_state_dict({name: state_dict[f"{prefix}.{name}"] for name in adapter.state_dict()})

    def set_scale(self, scale: float) -> None:
        """Multiply every adapter's output by `scale` (0 = the base model)."""
        for state in self.states.values():
            state.scale = float(scale)

    def unload(self) -> nn.Module:
        """Remove exactly what attach added (adapters and hooks); other LoRAs stay as they are."""
        for hook in self._layer_hooks:
            hook.remove()
        for linear in self.linears:
            delattr(linear, ADAPTER)
        for hook in self._hooks:
            hook.remove()
        for attention, own in self._unwatched:
            attention.__dict__.pop("fuse_projections", None)
            if own is not None:
                attention.fuse_projections = own
        del self.denoiser._tlora
        return self.denoiser


class _FuseWatch:
    """An adapted attention's fuse_projections while a T-LoRA is attached: runs it and marks the T-LoRA for a check
    at its next call. An object, not a closure, so that a model with a T-LoRA still deep-copies and pickles."""

    def __init__(self, tlora: TLoRA, fuse: Callable) -> None:
        self.tlora, self.fuse = tlora, fuse

    def __call__(self, *args, **kwargs):
        self.tlora._fused_since_check = True
        return self.fuse(*args, **kwargs)


def entry_of(path: str, entries: tuple[str, ...]) -> str:
    """The entry (DenoiserSpec.entries) whose calls run the Linear at `path`: the deepest one holding it."""
    holding = [e for e in entries if not e or path == e or path.startswith(f"{e}.")]
    if not holding:
        raise ValueError(f"the adapted layer {path} is under none of the denoiser's entries {entries}")
    return max(holding, key=len)


def attached(denoiser: nn.Module) -> TLoRA | None:
    """The TLoRA attached to `denoiser` (or to the model a torch.compile wrapper holds), if any."""
    return getattr(getattr(denoiser, "_orig_mod", denoiser), "_tlora", None)


def attach(
    model: nn.Module, settings: TLoRASettings, spec: DenoiserSpec, init: bool = True,
    svd_device: torch.device | str | None = None,
) -> TLoRA:
    """Give every adapted projection of the denoiser `model` (spec.layers) a fresh adapter (float32, on the
    model's device); `init=False` leaves the start to a checkpoint. T-LoRA's random starts are drawn in order
    and decomposed together, batched by shape on `svd_device`.

    Adapters are made in the authors' order (their attention processors' order, and within one the order
    their processor makes them), so one seed gives the same initial adapters in both tools. Where the
    authors make an adapter they never use (FLUX single blocks), a Vanilla one is made and dropped, to
    draw the same random numbers; an ortho_lora start, which they never make on FLUX, skips those.
    """
    if attached(model) is not None:
        raise ValueError(ALREADY_ATTACHED)
    check_not_compiled(model, spec)
    settings = settings.validate()
    adapters: dict[str, tuple[str, nn.Module]] = {}
    width = None
    rows: dict[str, tuple[int, int]] = {}
    starts: list[tuple[nn.Module, torch.Tensor, int]] = []  # ortho_lora: (adapter, its random R, rank)
    for layer in spec.layers:
        if layer.path is None:
            if init and settings.trainer_type == "lora" and width is not None:
                make_adapter("lora", width, width, min(settings.lora_rank, width))
            continue
        linear = base_linear(model.get_submodule(layer.path))
        width = linear.out_features if layer.rows is None else layer.rows[1] - layer.rows[0]
        rank = min(settings.lora_rank, linear.in_features, width)
        ortho = settings.trainer_type == "ortho_lora"
        adapter = make_adapter(settings.trainer_type, linear.in_features, width, rank, init and not ortho)
        if init and ortho:  # drawn in order now, decomposed all together below
            starts.append((adapter, draw_base(linear.in_features, width, rank), rank))
        adapters[layer.prefix] = (layer.path, adapter)
        if layer.rows is not None:
            rows[layer.prefix] = layer.rows
    if not adapters:
        raise ValueError("no attention projections found in this model")
    if starts:
        values = orthogonal_starts([b for _, b, _ in starts], [r for _, _, r in starts], settings.sig_type, svd_device)
        for (adapter, _, _), value in zip(starts, values):
            adapter.start(*value)
    return attach_adapters(model, settings, adapters, spec, rows)


def check_not_compiled(denoiser: nn.Module, spec: DenoiserSpec) -> None:
    """Refuse a denoiser torch.compiled before the T-LoRA is attached while dynamo does not guard on hooks (its
    default): its compiled graph would keep running without the adapters. With hook guards on (compile_denoiser
    turns them on) a new T-LoRA recompiles."""
    modules = [denoiser, *(denoiser.get_submodule(e) for e in spec.entries if e)]
    if any(hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None for m in modules):
        if torch._dynamo.config.skip_nnmodule_hook_guards:
            raise UsageError(COMPILED_FIRST)


COMPILED_FIRST = ("this denoiser was torch.compiled before the T-LoRA was attached, and its compiled graph would run "
                  "without it: load the T-LoRA first, then compile (tlora.load(..., compile=True), --compile)")


def attach_adapters(denoiser: nn.Module, settings: TLoRASettings, adapters: dict[str, tuple[str, nn.Module]],
                    spec: DenoiserSpec, rows: dict[str, tuple[int, int]] | None = None) -> TLoRA:
    """Attach ready-made adapters: checkpoint key prefix -> (path of the Linear in `denoiser`, adapter); `rows` names
    the output rows of the adapters that adapt part of a fused Linear (RowAdapters)."""
    if attached(denoiser) is not None:
        raise ValueError(ALREADY_ATTACHED)
    check_not_compiled(denoiser, spec)
    device, rows = next(denoiser.parameters()).device, rows or {}
    layers: dict[str, tuple[str, nn.Linear]] = {}
    on_linear: dict[int, list[str]] = {}
    for prefix, (path, _) in adapters.items():
        linear = base_linear(denoiser.get_submodule(path))
        layers[prefix] = (path, linear)
        on_linear.setdefault(id(linear), []).append(prefix)
    for prefixes in on_linear.values():
        linear = layers[prefixes[0]][1]
        if len(prefixes) == 1 and prefixes[0] not in rows:
            adapter = adapters[prefixes[0]][1]
        elif any(p not in rows for p in prefixes):
            raise ValueError(f"adapters {prefixes} share one Linear: each needs its output rows")
        else:
            adapter = RowAdapters(linear.out_features, {p: (rows[p], adapters[p][1]) for p in prefixes})
        linear.add_module(ADAPTER, adapter.to(device))
    try:
        return TLoRA(denoiser, MaskState(settings), layers, spec)
    except (UsageError, ValueError):
        for linear in {id(linear): linear for _, linear in layers.values()}.values():
            delattr(linear, ADAPTER)
        raise


def check_keys(expected: dict[str, torch.Size], found: dict[str, torch.Tensor]) -> None:
    """Raise naming the first expected key that is missing or has another shape, or the first extra key."""
    for key, shape in expected.items():
        if key not in found:
            raise KeyError(f"checkpoint has no tensor {key!r} (expected shape {tuple(shape)})")
        if found[key].shape != shape:
            raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(found[key].shape)}, expected {tuple(shape)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise KeyError(f"checkpoint has a tensor {extra[0]!r} that this model has no place for")
