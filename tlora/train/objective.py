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
    With `prior_weight`, the second half of the batch is class images: loss = instance + weight * class.
    """
    pred, target = family.predict(model, pipe, scheduler, batch, dtype, guidance)
    pred, target = pred.float(), target.float()
    if "mask" in batch:
        pred, target = pred * batch["mask"], target * batch["mask"]
    if prior_weight is None:
        return F.mse_loss(pred, target)
    pred, prior_pred = pred.chunk(2)
    target, prior_target = target.chunk(2)
    return F.mse_loss(pred, target) + prior_weight * F.mse_loss(prior_pred, prior_target)


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
