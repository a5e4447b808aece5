"""How long one training step takes on a GPU, modelled from the step traced on `meta` (estimator.trace_step).

Per kernel: the larger of its FLOPs over the GPU's dense peak (for its precision) and its bytes over the memory
bandwidth, plus a launch cost; summed over the step, under two stated sets of assumptions (LOW, HIGH), for eager
PyTorch and for torch.compile:

- `StepOps` records every aten operation of the traced step: its FLOPs (torch's flop formulas), the bytes it reads
  and writes (inputs, outputs, and inputs it writes in place; a view is no operation and costs nothing), which
  storages those are, and whether it runs in the compiled region (the denoiser's forward and the backward).
- eager: every operation is one kernel, launched at eager PyTorch's cost per operation (Python, dispatcher,
  autograd, the driver's launch: what bounds small operations).
- compiled (inductor, a simple model): in the compiled region an operation with a FLOP formula (matrix product,
  convolution, attention) stays its own kernel, and each run of other operations between two of them fuses into
  one kernel, which reads what the run reads from outside it and writes what is read after it or was there
  before it; outside the region (noise, loss, optimizer) operations run eagerly.
- a quantized base (bitsandbytes, torchao): every operation that reads a frozen Linear weight is preceded by that
  weight's dequantization, a kernel reading its packed bytes and writing it in the compute dtype.
- the optimizer step and gradient clipping are what CUDA runs, by formula (`optimizer_kernels`): the trace runs
  single-tensor AdamW, since meta has no fused kernels.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry


@dataclass(frozen=True)
class GPU:
    """Dense peak TFLOP/s (no sparsity) per precision, and memory bandwidth in GB/s."""

    bf16: float
    fp16: float
    tf32: float
    fp32: float
    bandwidth: float


GPUS = {
    # NVIDIA A100 datasheet, SXM4 80 GB: https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/
    # nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf (BF16/FP16 312, TF32 156, FP32 19.5; HBM2e 2,039 GB/s)
    "A100": GPU(bf16=312, fp16=312, tf32=156, fp32=19.5, bandwidth=2039),
    # NVIDIA H100 datasheet, SXM: https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
    # (BF16/FP16 1,979 and TF32 989 with sparsity: half dense; FP32 67; HBM3 3.35 TB/s)
    "H100": GPU(bf16=989, fp16=989, tf32=494, fp32=67, bandwidth=3350),
    # NVIDIA Ada Lovelace architecture whitepaper v2.1, RTX 4090 column: https://images.nvidia.com/aem-dam/
    # Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf (FP16/BF16 tensor with FP32 accumulate, as PyTorch
    # accumulates, 165.2; TF32 82.6; FP32 82.6; GDDR6X 1,008 GB/s)
    "RTX 4090": GPU(bf16=165.2, fp16=165.2, tf32=82.6, fp32=82.6, bandwidth=1008),
    # NVIDIA L40S datasheet: https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413 (BF16/FP16 733 and
    # TF32 366 with sparsity: half dense; FP32 91.6; GDDR6 864 GB/s)
    "L40S": GPU(bf16=362, fp16=362, tf32=183, fp32=91.6, bandwidth=864),
}


@dataclass(frozen=True)
class Assumptions:
    """One end of the range: the share of the dense peak an operation with a FLOP formula reaches, the share of the
    memory bandwidth any kernel reaches, the launch cost (microseconds, on the CPU) of an eager operation and of a
    kernel of inductor's generated code, and whether launches overlap the GPU's work (CUDA launches are
    asynchronous: the CPU issues kernels ahead until a host sync) or add to it."""

    compute_share: float
    bandwidth_share: float
    eager_launch_us: float
    compiled_launch_us: float
    overlap: bool


# Fixed before any comparison with a measured step (tests/test_step_time.py). Launch costs, measured on the CPU side:
# eager 7 us: one operation with autograd on a tiny tensor (pytorch/pytorch#41383: 1e6 `2 * x` in 6.8 s);
# eager 23 us: an eager fp16 matmul's CPU time (triton-lang/triton#459, do_bench on an A6000: 0.0232 ms);
# compiled 6.8 / 9.1 us: inductor's launch of one kernel, 0 / 19 arguments (meta-pytorch/tritonbench#1017,
# nop_inductor_per_kernel). Shares: large GEMMs reach 60-80% of the dense peak, copies 70-90% of the bandwidth.
# The high end is the formula as it stands (each kernel's time plus its launch); the low end lets the GPU work while
# the CPU issues the next kernels.
LOW = Assumptions(compute_share=0.8, bandwidth_share=0.9, eager_launch_us=7.0, compiled_launch_us=6.8, overlap=True)
HIGH = Assumptions(compute_share=0.6, bandwidth_share=0.7, eager_launch_us=23.0, compiled_launch_us=9.1,
                   overlap=False)

# Views and allocations: no kernel of their own (bench/launch_count.py counts operations without them).
VIEWS = {"aten.detach.default", "aten.view.default", "aten._unsafe_view.default", "aten.t.default",
         "aten.transpose.int", "aten.expand.default", "aten.slice.Tensor", "aten.select.int", "aten.permute.default",
         "aten.unsqueeze.default", "aten.squeeze.dim", "aten.alias.default"}
NO_KERNEL = VIEWS | {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
                     "aten.new_empty.default", "aten.new_empty_strided.default", "aten.lift_fresh.default",
                     "aten.as_strided.default", "aten._reshape_alias.default", "aten.split.Tensor",
                     "aten.split_with_sizes.default", "aten.unbind.int", "aten.squeeze.dims", "aten.unflatten.int",
                     "aten.view_as_real.default", "aten.view_as_complex.default", "aten.diagonal.default"}
HALF = {torch.bfloat16: "bf16", torch.float16: "fp16"}
SYNC = "aten._local_scalar_dense.default"  # .item(): the CPU waits for the GPU


@dataclass(slots=True)
class Op:
    """One traced operation: FLOPs and the precision of its peak; bytes read and written per storage (storage id ->
    bytes); its phase ("eager", "compiled", or "optimizer": modelled by formula); the numel and bytes of the frozen
    Linear weights it reads (what a quantized base dequantizes first); whether the host waits for it."""

    flops: int
    precision: str
    reads: dict[int, int]
    writes: dict[int, int]
    phase: str
    base_numel: int = 0
    base_bytes: int = 0
    sync: bool = False


def extent(t: torch.Tensor) -> int:
    """Bytes a kernel touches for `t`: its elements, a broadcast (stride 0) dimension once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride else 1
    return n * t.element_size()


class StepOps(TorchDispatchMode):
    """Every aten operation that runs a kernel, as an `Op`. Set `phase` while tracing; `base` is the frozen Linear
    weights; with `allow_tf32` fp32 matrix products take TF32 peaks (convolutions always do: cuDNN's default)."""

    def __init__(self, base: Sequence[torch.Tensor] = (), allow_tf32: bool = False) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self.phase = "eager"
        self.allow_tf32 = allow_tf32
        self._ids: dict[int, tuple[int, weakref.ref]] = {}
        self._next = itertools.count()
        self._base = {t.untyped_storage()._cdata for t in base}

    def _id(self, t: torch.Tensor) -> int:
        """A number for `t`'s storage, never reused for another storage (addresses are, once freed)."""
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self._ids:
            self._ids[key] = (next(self._next), weakref.ref(storage, lambda _, k=key: self._ids.pop(k, None)))
        return self._ids[key][0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "aten" and str(func) not in NO_KERNEL:
            self.ops.append(self._op(func, args, kwargs, out))
        return out

    def _op(self, func, args, kwargs, out) -> Op:
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        written = [t for t in tree_leaves((out, _mutated(func, args, kwargs))) if isinstance(t, torch.Tensor)]
        formula = flop_registry.get(func._overloadpacket)
        flops = formula(*args, **kwargs, out_val=out) if formula else 0
        base = {t.untyped_storage()._cdata: t for t in inputs if t.untyped_storage()._cdata in self._base}
        return Op(flops, self._precision(func, inputs) if flops else "", _bytes(self, inputs), _bytes(self, written),
                  self.phase, sum(t.numel() for t in base.values()), sum(extent(t) for t in base.values()),
                  str(func) == SYNC)

    def _precision(self, func, inputs: list[torch.Tensor]) -> str:
        dtype = next((t.dtype for t in inputs if t.is_floating_point()), torch.float32)
        if dtype in HALF:
            return HALF[dtype]
        name = func._overloadpacket.__name__
        return "tf32" if "convolution" in name or (self.allow_tf32 and "attention" not in name) else "fp32"


def _mutated(func, args, kwargs) -> list:
    """The arguments `func` writes in place (its schema's `Tensor(a!)`)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            out.append(args[i] if i < len(args) else kwargs.get(arg.name))
    return out


def _bytes(ops: StepOps, tensors: list[torch.Tensor]) -> dict[int, int]:
    """Bytes per storage: the largest view of it among `tensors`."""
    out: dict[int, int] = {}
    for t in tensors:
        key = ops._id(t)
        out[key] = max(out.get(key, 0), extent(t))
    return out


@dataclass
class Kernels:
    """A step's kernels as columns: FLOPs, bytes, the precision of the peak ("" without FLOPs), eager or not, a host
    sync or not."""

    flops: list[float] = field(default_factory=list)
    nbytes: list[float] = field(default_factory=list)
    precision: list[str] = field(default_factory=list)
    eager: list[bool] = field(default_factory=list)
    sync: list[bool] = field(default_factory=list)

    def add(self, flops: float, nbytes: float, precision: str = "", eager: bool = True, sync: bool = False) -> None:
        self.flops.append(flops)
        self.nbytes.append(nbytes)
        self.precision.append(precision)
        self.eager.append(eager)
        self.sync.append(sync)

    def seconds(self, gpu: GPU, a: Assumptions) -> float:
        """Per kernel max(FLOPs / peak, bytes / bandwidth) on the GPU and its launch on the CPU: summed, or (overlap)
        with the GPU starting a kernel once it is issued and the one before it is done."""
        f64 = torch.float64
        peaks = torch.tensor([getattr(gpu, p) if p else 1.0 for p in self.precision], dtype=f64)
        compute = torch.tensor(self.flops, dtype=f64) / (peaks * 1e12 * a.compute_share)
        memory = torch.tensor(self.nbytes, dtype=f64) / (gpu.bandwidth * 1e9 * a.bandwidth_share)
        launch = torch.where(torch.tensor(self.eager, dtype=torch.bool), a.eager_launch_us, a.compiled_launch_us)
        busy, issue = torch.maximum(compute, memory).tolist(), (launch * 1e-6).tolist()
        if not a.overlap:
            return sum(busy) + sum(issue)
        cpu = done = 0.0
        for work, cost, sync in zip(busy, issue, self.sync):
            cpu += cost
            done = max(cpu, done) + work
            cpu = done if sync else cpu
        return done


def step_kernels(ops: list[Op], compiled: bool, quantized: float | None = None) -> Kernels:
    """The kernels of the traced operations (the optimizer phase left out: `optimizer_kernels`), eager or compiled;
    `quantized`: bytes per weight of a quantized base, whose dequantizations come first."""
    out = Kernels()
    born, last_read = _lifetimes(ops)
    run: list[int] = []
    for i, op in enumerate(ops):
        if compiled and op.phase == "compiled" and not op.flops:
            run.append(i)
            continue
        _fuse(ops, run, born, last_read, out, quantized)
        run = []
        if op.phase != "optimizer":
            eager = not compiled or op.phase != "compiled"
            _dequantize(op, quantized, out, eager)
            out.add(op.flops, sum(op.reads.values()) + sum(op.writes.values()), op.precision, eager, op.sync)
    _fuse(ops, run, born, last_read, out, quantized)
    return out


def _lifetimes(ops: list[Op]) -> tuple[dict[int, int], dict[int, int]]:
    """Per storage: the operation that creates it (-1: it was there before, or is first read), the last to read it."""
    born: dict[int, int] = {}
    last_read: dict[int, int] = {}
    for i, op in enumerate(ops):
        for s in op.reads:
            last_read[s] = i
            born.setdefault(s, -1)
        for s in op.writes:
            born.setdefault(s, i)
    return born, last_read


def _fuse(ops: list[Op], run: list[int], born: dict[int, int], last_read: dict[int, int], out: Kernels,
          quantized: float | None) -> None:
    """One kernel for a run of operations without FLOPs: it reads what the run reads from outside it and writes
    what is read after the run or was there before it."""
    if not run:
        return
    start, end = run[0], run[-1]
    made: set[int] = set()
    reads: dict[int, int] = {}
    writes: dict[int, int] = {}
    for i in run:
        _dequantize(ops[i], quantized, out, eager=False)
        for s, n in ops[i].reads.items():
            if s not in made:
                reads[s] = max(reads.get(s, 0), n)
        for s, n in ops[i].writes.items():
            made.add(s)
            if last_read.get(s, -1) > end or born[s] < start:
                writes[s] = max(writes.get(s, 0), n)
    out.add(0, sum(reads.values()) + sum(writes.values()), "", False)


def _dequantize(op: Op, quantized: float | None, out: Kernels, eager: bool) -> None:
    """A quantized base's weight unpacked before the operation that reads it: packed bytes in, the weight out."""
    if quantized is not None and op.base_numel:
        out.add(0, op.base_numel * quantized + op.base_bytes, "", eager)


# What CUDA runs for the adapters' update, per trained value (float32: 4 bytes) and per parameter tensor:
# - clipping, torch.nn.utils.clip_grad_norm_ (foreach on CUDA): _foreach_norm (reads the gradients), stack,
#   vector_norm, add, div, clamp, _foreach_mul_ (reads and writes them);
# - AdamW, torch's fused kernel: _foreach_add_ of the step counts, _fused_adamw_ (reads parameter, gradient and two
#   moments, writes parameter and moments: 28 bytes per value);
# - 8-bit AdamW, bitsandbytes: one kernel per tensor (parameter read and written, gradient read, two uint8 states
#   read and written: 16 bytes; tensors under 4096 values keep float32 states: 28);
# - Prodigy (prodigyopt 1.1.2): a Python loop of operations per tensor, counted with StepOps on the CPU.
PRODIGY_OPS, PRODIGY_BYTES = 15, 124


def optimizer_kernels(out: Kernels, optimizer: str, eight_bit: bool, numels: list[int], clip: bool) -> None:
    """Append the kernels of clipping and the optimizer step (launched eagerly: train.py compiles the denoiser)."""
    values = sum(numels)
    if clip:
        out.add(0, 4 * values)
        for _ in range(5):
            out.add(0, 0)
        out.add(0, 8 * values)
    if optimizer == "prodigy":  # two of its operations per tensor are .item(): host syncs
        for n in numels:
            out.add(0, PRODIGY_BYTES * n)
            for i in range(PRODIGY_OPS - 1):
                out.add(0, 0, sync=i < 2)
    elif eight_bit:
        for n in numels:
            out.add(0, (16 if n >= 4096 else 28) * n)
    else:
        out.add(0, 0)
        out.add(0, 28 * values)
