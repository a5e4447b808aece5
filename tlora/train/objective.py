"""What training minimises: the denoising loss of one batch, and the optimizer that minimises it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_loss(
    family, model, pipe, scheduler, batch: dict[str, torch.Tensor], dtype: torch.dtype, prior_weight: float | None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """MSE between the denoiser's prediction and its `family`'s target (families.base.Family.predict) for fresh
    noise and timesteps.

    With a `mask` in the batch (--mask_dir, --alpha_mask), prediction and target are multiplied by it first.
    With `prior_weight`, the second half of the batch is class images: loss = instance + weight * class; class
    photos of another shape than the instance rows (clips: conditioning.Conditioning.batch) come as `batch["class"]`
    and are predicted in a call of their own.
    """
    if isinstance(batch.get("class"), dict):
        instance = {k: v for k, v in batch.items() if k != "class"}
        return (_masked_mse(family, model, pipe, scheduler, instance, dtype, guidance)
                + prior_weight * _masked_mse(family, model, pipe, scheduler, batch["class"], dtype, guidance))
    pred, target = _masked(family, model, pipe, scheduler, batch, dtype, guidance)
    if prior_weight is None:
        return F.mse_loss(pred, target)
    pred, prior_pred = pred.chunk(2)
    target, prior_target = target.chunk(2)
    return F.mse_loss(pred, target) + prior_weight * F.mse_loss(prior_pred, prior_target)


def _masked(family, model, pipe, scheduler, batch: dict[str, torch.Tensor], dtype: torch.dtype, guidance: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, target) in float32, times the batch's loss mask if it has one."""
    pred, target = family.predict(model, pipe, scheduler, batch, dtype, guidance)
    pred, target = pred.float(), target.float()
    if "mask" in batch:
        pred, target = pred * batch["mask"], target * batch["mask"]
    return pred, target


def _masked_mse(*args) -> torch.Tensor:
    return F.mse_loss(*_masked(*args))


def make_optimizer(opts, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Constant learning rate. AdamW: bitsandbytes' 8-bit version with --use_8bit_adam, else torch's fused
    kernel (one pass over all adapter tensors; 2.5x faster than the default on the CPU too).
    Prodigy (the authors' FLUX default; learning rate 1.0 means Prodigy's own step size)."""
    hyper = dict(lr=opts.learning_rate, betas=(opts.adam_beta1, opts.adam_beta2),
                 weight_decay=opts.adam_weight_decay, eps=opts.adam_epsilon)
    if opts.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, **hyper)
    if opts.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **hyper)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, fused=fused, **hyper)
