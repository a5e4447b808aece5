"""The T-LoRA math: rank schedule, masks, initialization, gradients."""

import math

import pytest
import torch
from torch import nn

from tlora.method.adapters import (
    PARAMS,
    LoRAAdapter,
    OrthoLoRAAdapter,
    active_rank,
    draw_base,
    make_adapter,
    orthogonal_starts,
    rank_mask,
)
from tlora.method.injection import ADAPTER, RowAdapters


def orthogonal_start(n_in: int, n_out: int, rank: int, sig_type: str = "last"):
    """(Q, P, lambda) of one adapter as attach starts it: its R drawn, then decomposed."""
    return orthogonal_starts([draw_base(n_in, n_out, rank)], [rank], sig_type)[0]


def started(n_in: int, n_out: int, rank: int, sig_type: str = "last") -> OrthoLoRAAdapter:
    """A T-LoRA adapter started as attach starts it: made (its Linears draw), its R drawn and decomposed, set."""
    adapter = OrthoLoRAAdapter(n_in, n_out, rank)
    adapter.start(*orthogonal_start(n_in, n_out, rank, sig_type))
    return adapter


def formula(t: int, max_rank: int, min_rank: int, alpha: float = 1.0, T: int = 1000) -> int:
    return int(((T - t) / T) ** alpha * (max_rank - min_rank)) + min_rank


@pytest.mark.parametrize("t, expected", [(0, 64), (999, 32), (500, 48), (250, 56), (750, 40)])
def test_rank_at_key_timesteps(t, expected):
    assert active_rank(t, 1000, 64, 32).item() == expected


def test_rank_alpha_not_one():
    assert active_rank(500, 1000, 64, 32, alpha=2.0).item() == 40  # 0.25 * 32 + 32
    assert active_rank(500, 1000, 64, 32, alpha=0.5).item() == int(0.5 ** 0.5 * 32) + 32


@pytest.mark.parametrize("max_rank, min_rank, alpha", [(64, 32, 1.0), (4, 1, 1.0), (128, 1, 2.0), (16, 16, 1.0)])
def test_rank_matches_formula_for_every_timestep(max_rank, min_rank, alpha):
    ranks = active_rank(torch.arange(1000), 1000, max_rank, min_rank, alpha).tolist()
    assert ranks == [formula(t, max_rank, min_rank, alpha) for t in range(1000)]


def test_mask_is_per_sample():
    mask = rank_mask(torch.tensor([0, 999, 500]), 1000, 8, 2)
    assert mask.shape == (3, 8)
    assert mask.sum(1).tolist() == [8, 2, 5]
    assert torch.equal(mask[1], torch.tensor([1.0, 1, 0, 0, 0, 0, 0, 0]))


@pytest.mark.parametrize("cls", [LoRAAdapter, OrthoLoRAAdapter])
def test_per_sample_mask_equals_separate_calls(cls):
    torch.manual_seed(0)
    adapter = cls(12, 10, 6)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(3, 5, 12)
    mask = rank_mask(torch.tensor([10, 600, 990]), 1000, 6, 1)
    together = adapter(x, mask)
    for i in range(3):
        assert torch.allclose(together[i : i + 1], adapter(x[i : i + 1], mask[i : i + 1]), atol=1e-6)
    assert not torch.allclose(together[0], adapter(x[0:1], mask[2:3])[0])


@pytest.mark.parametrize("cls", [LoRAAdapter, OrthoLoRAAdapter])
def test_zero_output_at_init(cls):
    torch.manual_seed(1)
    adapter = started(20, 16, 8) if cls is OrthoLoRAAdapter else cls(20, 16, 8)
    x = torch.randn(2, 7, 20)
    assert torch.equal(adapter(x), torch.zeros(2, 7, 16))
    assert torch.equal(adapter(x, rank_mask(torch.tensor([0, 700]), 1000, 8, 2)), torch.zeros(2, 7, 16))


def test_lora_init_distribution():
    torch.manual_seed(0)
    adapter = LoRAAdapter(512, 256, 16)
    assert adapter.up.weight.abs().max() == 0
    assert adapter.down.weight.std().item() == pytest.approx(1 / 16, rel=0.05)


@pytest.mark.parametrize("sig_type", ["principal", "last", "middle"])
@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
def test_orthogonal_start_is_the_svd_slice(sig_type, shape):
    n_in, n_out, r = *shape, 4
    torch.manual_seed(3)
    q, p, lam = orthogonal_start(n_in, n_out, r, sig_type)
    torch.manual_seed(3)
    u, s, vh = torch.linalg.svd(torch.normal(mean=0.0, std=1 / r, size=(n_in, n_out)))
    starts = {
        "principal": (0, 0, 0),
        "last": (n_in - r, n_out - r, min(shape) - r),
        "middle": (math.ceil((n_in - r) / 2), math.ceil((n_out - r) / 2), math.ceil((min(shape) - r) / 2)),
    }[sig_type]
    assert torch.equal(q, u[starts[0] : starts[0] + r])
    assert torch.equal(p, vh[:, starts[1] : starts[1] + r])
    assert torch.equal(lam, s[None, starts[2] : starts[2] + r])
    assert torch.allclose(q @ q.T, torch.eye(r), atol=1e-5)  # Q rows orthonormal
    assert torch.allclose(p.T @ p, torch.eye(r), atol=1e-5)  # P columns orthonormal


def test_ortho_adapter_frozen_copies_and_trainables():
    torch.manual_seed(0)
    a = started(24, 16, 4)
    assert torch.equal(a.q_layer.weight, a.base_q.weight) and torch.equal(a.p_layer.weight, a.base_p.weight)
    assert torch.equal(a.lambda_layer, a.base_lambda)
    trainable = {n for n, p in a.named_parameters() if p.requires_grad}
    assert trainable == {"q_layer.weight", "p_layer.weight", "lambda_layer"}
    assert a.lambda_layer.shape == (1, 4) and a.q_layer.weight.shape == (4, 24) and a.p_layer.weight.shape == (16, 4)


def test_ortho_init_draws_random_numbers_as_the_authors_do():
    """Two nn.Linear inits, then one normal draw of shape (in, out): the authors' order, so seeds agree."""
    torch.manual_seed(7)
    a = started(24, 16, 4)
    torch.manual_seed(7)
    nn.Linear(24, 4, bias=False), nn.Linear(4, 16, bias=False)
    u, s, vh = torch.linalg.svd(torch.normal(size=(24, 16), mean=0, std=1 / 4))
    assert torch.equal(a.q_layer.weight.data, u[-4:])
    assert torch.equal(a.p_layer.weight.data, vh[:, -4:])
    after = torch.rand(1)
    torch.manual_seed(7)
    started(24, 16, 4)
    assert torch.equal(torch.rand(1), after)  # nothing else drawn


def test_lora_init_draws_random_numbers_as_the_authors_do():
    torch.manual_seed(5)
    a = LoRAAdapter(24, 16, 4)
    torch.manual_seed(5)
    down = nn.Linear(24, 4, bias=False)
    nn.Linear(4, 16, bias=False)
    nn.init.normal_(down.weight, std=1 / 4)
    assert torch.equal(a.down.weight, down.weight)


@pytest.mark.parametrize("cls", [LoRAAdapter, OrthoLoRAAdapter])
def test_masked_out_components_get_no_gradient(cls):
    torch.manual_seed(0)
    adapter = cls(12, 10, 6)
    with torch.no_grad():
        for p in adapter.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    mask = rank_mask(torch.tensor([999]), 1000, 6, 2)  # 2 of 6 active
    adapter(torch.randn(2, 3, 12), mask).square().sum().backward()
    if cls is LoRAAdapter:
        rows, cols = adapter.down.weight.grad, adapter.up.weight.grad
    else:
        rows, cols = adapter.q_layer.weight.grad, adapter.p_layer.weight.grad
        assert torch.all(adapter.lambda_layer.grad[:, 2:] == 0) and torch.all(adapter.lambda_layer.grad[:, :2] != 0)
    assert torch.all(rows[2:] == 0) and rows[:2].abs().sum() > 0
    assert torch.all(cols[:, 2:] == 0) and cols[:, :2].abs().sum() > 0


def test_dtype_round_trip():
    torch.manual_seed(0)
    adapter = OrthoLoRAAdapter(8, 8, 2)
    out = adapter(torch.randn(1, 3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and adapter.q_layer.weight.dtype == torch.float32


def test_ortho_forward_equals_the_authors_formula():
    """P((Qx) * l * m) - P0((Q0x) * l0 * m), computed path by path as the authors' layer does."""
    torch.manual_seed(0)
    a = OrthoLoRAAdapter(12, 10, 6)
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 5, 12)
    mask = rank_mask(torch.tensor([100, 900]), 1000, 6, 2)[:, None, :]
    q, p, lam = a.q_layer.weight, a.p_layer.weight, a.lambda_layer
    q0, p0, lam0 = a.base_q.weight, a.base_p.weight, a.base_lambda
    expected = ((x @ q.T) * lam * mask) @ p.T - ((x @ q0.T) * lam0 * mask) @ p0.T
    assert torch.allclose(a(x, mask[:, 0]), expected, atol=1e-6)


def test_batched_orthogonal_starts_equal_one_svd_each_and_attach_draws_in_order(unet):
    """T-LoRA's starts are decomposed batched by shape: bitwise the per-matrix SVD slices, and attach draws the
    random matrices in the authors' order (each adapter's own Linear draws, then its R), as one-by-one
    construction does."""
    torch.manual_seed(0)
    bases = [draw_base(*shape, 4) for shape in ((24, 16), (16, 24), (24, 16), (16, 16))]
    for (q, p, lam), base in zip(orthogonal_starts(bases, [4] * 4, "middle"), bases):
        assert all(t.is_contiguous() for t in (q, p, lam))
        u, s, vh = torch.linalg.svd(base, full_matrices=True)
        start = [math.ceil((n - 4) / 2) for n in (*base.shape, len(s))]
        assert torch.equal(q, u[start[0]:start[0] + 4]) and torch.equal(p, vh[:, start[1]:start[1] + 4])
        assert torch.equal(lam, s[None, start[2]:start[2] + 4])

    from tlora.families import SDXL, attach
    from tlora.method.settings import TLoRASettings

    torch.manual_seed(3)
    state = attach(unet, TLoRASettings("ortho_lora", 4, 2, family="sdxl")).state_dict()
    torch.manual_seed(3)
    for layer in SDXL.layers(unet):
        linear = unet.get_submodule(layer.path)
        rank = min(4, linear.in_features, linear.out_features)
        one = started(linear.in_features, linear.out_features, rank)
        for name, value in one.state_dict().items():
            assert torch.equal(state[f"{layer.prefix}.{name}"], value), (layer.prefix, name)



@pytest.mark.parametrize("trainer_type", ["lora", "ortho_lora"])
def test_a_mask_cut_at_the_last_active_component_gives_the_full_masks_update(trainer_type):
    """On the CPU the adapters get the mask only as far as the largest active rank (MaskState.active) and compute
    only those components: the same output and gradients as with the whole mask."""
    torch.manual_seed(0)
    adapter = make_adapter(trainer_type, 24, 16, 8)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    full = torch.tensor([[1.0] * 5 + [0.0] * 3, [1.0] * 3 + [0.0] * 5])
    results = []
    for mask in (full, full[:, :5]):
        adapter.zero_grad()
        x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = adapter(x, mask)
        (y * torch.linspace(-1, 1, 16)).sum().backward()
        results.append([y.detach(), x.grad] + [p.grad for p in adapter.parameters() if p.requires_grad])
    for cut, whole in zip(*results):
        assert torch.allclose(cut, whole, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("trainer_type", ["lora", "ortho_lora"])
def test_params_name_each_adapters_state(trainer_type):
    """PARAMS (what runs.keys builds on) are the adapters' own state_dict names, trained down and up first."""
    adapter = make_adapter(trainer_type, 12, 10, 4)
    assert set(adapter.state_dict()) == set(PARAMS[trainer_type])
    down, up = PARAMS[trainer_type][:2]
    assert adapter.state_dict()[down].shape == (4, 12) and adapter.state_dict()[up].shape == (10, 4)


def test_a_start_may_give_the_frozen_factors_their_own_values():
    a = OrthoLoRAAdapter(6, 5, 2)
    q, p, lam = torch.randn(2, 6), torch.randn(5, 2), torch.randn(1, 2)
    a.start(q, p, lam, frozen=(2 * q, 3 * p, 4 * lam))
    assert torch.equal(a.q_layer.weight, q) and torch.equal(a.base_q.weight, 2 * q)
    assert torch.equal(a.p_layer.weight, p) and torch.equal(a.base_p.weight, 3 * p)
    assert torch.equal(a.lambda_layer, lam) and torch.equal(a.base_lambda, 4 * lam)


def fused_with_rows(trainer_type: str, start: bool) -> tuple[nn.Linear, RowAdapters]:
    """A fused Linear (q, k, v rows of 6 each, then 5 MLP rows) with one adapter of rank 3 on each of q, k, v."""
    torch.manual_seed(0)
    linear = nn.Linear(7, 23)
    parts = {}
    for i in range(3):
        adapter = make_adapter(trainer_type, 7, 6, 3)
        if trainer_type == "ortho_lora":
            adapter.start(*orthogonal_start(7, 6, 3))
        if not start:
            with torch.no_grad():
                for p in adapter.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn_like(p) * 0.3)
        parts[f"p{i}"] = ((6 * i, 6 * i + 6), adapter)
    rows = RowAdapters(23, parts)
    linear.add_module(ADAPTER, rows)
    return linear, rows


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("trainer_type", ["lora", "ortho_lora"])
def test_stacked_adapters_on_a_fused_layer_equal_each_adapter_alone(trainer_type, autocast):
    """q, k, v adapters run stacked (one down-projection, one batched up-projection, one add into their rows):
    output and every gradient equal running them one by one (within float rounding); the MLP rows are untouched."""
    linear, rows = fused_with_rows(trainer_type, start=False)
    close = (lambda a, b: torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)) if autocast else (
        lambda a, b: torch.allclose(a, b, atol=1e-6))
    assert rows.stacked
    x = torch.randn(2, 4, 7, requires_grad=True)
    mask = rank_mask(torch.tensor([100, 900]), 1000, 3, 1)
    results = []
    for stacked in (True, False):
        rows.stacked = stacked
        for p in [x, *rows.parameters()]:
            p.grad = None
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            base = linear(x)
            out = rows.add_to(base.clone(), x, mask)
        (out.float() * torch.linspace(-1, 1, 23)).sum().backward()
        results.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in rows.parameters() if p.requires_grad]))
        assert torch.equal(out[..., 18:], base[..., 18:])
    (out_s, gx_s, grads_s), (out_1, gx_1, grads_1) = results
    assert close(out_s, out_1) and close(gx_s, gx_1) and out_s.dtype == out_1.dtype == base.dtype
    assert len(grads_s) == len(grads_1) > 0 and all(close(a, b) for a, b in zip(grads_s, grads_1))
    assert all(g.dtype == torch.float32 for g in grads_s)


@pytest.mark.parametrize("autocast", [False, True])
def test_stacked_t_lora_starts_exactly_at_zero(autocast):
    """The frozen start's branch, cast once and subtracted through -lambda0, cancels the trained one bit for bit."""
    linear, rows = fused_with_rows("ortho_lora", start=True)
    x = torch.randn(2, 4, 7)
    mask = rank_mask(torch.tensor([100, 900]), 1000, 3, 1)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        base = linear(x)
        assert torch.equal(rows.add_to(base.clone(), x, mask), base)
        single = rows.part("p0")
        assert torch.equal(single(x, mask, base.dtype), torch.zeros(2, 4, 6, dtype=base.dtype))


def test_the_frozen_start_is_cast_once_and_again_when_it_changes():
    adapter = started(8, 6, 4)
    first = adapter.frozen(torch.bfloat16)
    assert adapter.frozen(torch.bfloat16) is first and first[0].down.dtype == torch.bfloat16
    # half-precision products: -lambda0 scales the up-projection, in float32 before the cast (as the trained branch)
    assert first[0].lam is None and torch.equal(first[0].up, (adapter.base_p.weight * -adapter.base_lambda).bfloat16())
    assert torch.equal(adapter.frozen(torch.float32)[0].lam, -adapter.base_lambda)  # float32: the authors' order
    state = {k: v + 1 if k.startswith("base_") else v for k, v in adapter.state_dict().items()}
    adapter.load_state_dict(state)  # new frozen factors: made again, from them
    again = adapter.frozen(torch.bfloat16)
    assert again is not first and torch.equal(again[0].down, adapter.base_q.weight.to(torch.bfloat16))
    x, mask = torch.randn(2, 3, 8), rank_mask(torch.tensor([300, 700]), 1000, 4, 2)
    with torch.autocast("cpu", torch.bfloat16):
        out = adapter(x, mask)
    q, p, lam = adapter.q_layer.weight, adapter.p_layer.weight, adapter.lambda_layer
    q0, p0, lam0 = adapter.base_q.weight, adapter.base_p.weight, adapter.base_lambda
    m = mask[:, None, :]
    expected = ((x @ q.T) * lam * m) @ p.T - ((x @ q0.T) * lam0 * m) @ p0.T
    assert torch.allclose(out, expected, atol=0.1, rtol=0.02)  # bf16 products


class _ViewingMatMul(torch.autograd.Function):
    """x @ w.T returned as a view made inside the Function, as bitsandbytes' int8 matmul returns it."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad @ w, (grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]))


def test_rows_add_into_a_layer_output_that_a_custom_function_returns_as_a_view():
    linear, rows = fused_with_rows("lora", start=False)
    x = torch.randn(2, 4, 7, requires_grad=True)
    output = _ViewingMatMul.apply(x, linear.weight)
    assert output._is_view()
    out = rows.add_to(output, x, None)
    expected = _ViewingMatMul.apply(x, linear.weight).detach() + rows(x).detach()
    assert torch.allclose(out, expected, atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and rows.parts[0].up.weight.grad is not None


def test_a_step_after_sampling_in_inference_mode_trains():
    """The frozen start cast under torch.inference_mode is an ordinary tensor: a training step can save it."""
    adapter = started(8, 6, 4)
    x, mask = torch.randn(2, 3, 8), rank_mask(torch.tensor([300, 700]), 1000, 4, 2)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        adapter(x, mask)
    with torch.autocast("cpu", torch.bfloat16):
        adapter(x, mask).float().sum().backward()
    assert adapter.q_layer.weight.grad is not None
