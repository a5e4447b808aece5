"""The authors' files, made as their code makes them (for tests), and their T-LoRA's FLUX forward written out.

Their FLUX code (flux/run.py -> flux/train.py) writes `<run>/logs/hparams.yml` with `yaml.dump(vars(args))` and
`<run>/checkpoint-N/lora.pt` with `torch.save(AttnProcsLayers(...).state_dict())`: per attention processor seven
Vanilla layers (down: nn.Linear(hidden, r), normal std 1/r; up: zeros), in q, k, v, out, q_proj, k_proj, v_proj
order, the single blocks' last four never used. `FLUX_HPARAMS` holds every key of the hparams.yml their code wrote
for ../shared/authors_runs/flux_hparams.yml (paths replaced), so that these tests run without that folder too.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

LAYERS = ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora", "to_q_proj_lora", "to_k_proj_lora", "to_v_proj_lora")

FLUX_HPARAMS = {
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-08, "adam_weight_decay": 0.0001,
    "adam_weight_decay_text_encoder": 0.001, "allow_tf32": False, "cache_latents": False, "checkpointing_steps": 5,
    "class_name": "dog", "dataloader_num_workers": 0, "exp_name": "00001-61c6-dog_example_tlora8",
    "gradient_accumulation_steps": 1, "gradient_checkpointing": False, "guidance_scale": 1, "instance_data_dir": "PATH",
    "instance_prompt": "a photo of sks dog", "learning_rate": 1.0, "local_rank": -1, "logging_dir": "logs",
    "logit_mean": 0.0, "logit_std": 1.0, "lr_num_cycles": 1, "lr_power": 1.0, "lr_scheduler": "constant",
    "lr_warmup_steps": 0, "mask_dir": None, "max_grad_norm": 1.0, "max_sequence_length": 512, "max_train_steps": 10,
    "min_rank": 4, "mixed_precision": "bf16", "mode_scale": 1.29, "num_train_epochs": 10, "num_validation_images": 3,
    "one_image": "02.jpg", "optimizer": "prodigy", "output_dir": "PATH", "placeholder_token": "sks",
    "pretrained_model_name_or_path": "PATH", "prior_generation_precision": None, "prodigy_beta3": None,
    "prodigy_decouple": True, "prodigy_safeguard_warmup": True, "prodigy_use_bias_correction": True, "rank": 8,
    "repeats": 1, "report_to": "tensorboard", "resolution": 64, "revision": None, "scale_lr": False, "seed": 0,
    "text_encoder_lr": 5e-06, "tlora": True, "train_batch_size": 1, "upcast_before_saving": False,
    "use_8bit_adam": False, "validation_prompt": "a {0} in the jungle in a outfit made of green leaves#a {0} riding "
    "a bike in a white t-shirt#a {0} in a purple wizzard outfit and a hat in a magic forest", "variant": None,
    "weighting_scheme": "none",
}
# What their run_inference.py reads from hparams.yml.
FLUX_INFERENCE_KEYS = ("tlora", "rank", "min_rank", "pretrained_model_name_or_path", "output_dir", "placeholder_token",
                       "class_name")


def flux_start(transformer: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """Their FLUX start, made their way (seven LoRALinearLayers per processor, in their order)."""
    hidden = transformer.inner_dim
    state = {}
    for name in transformer.attn_processors:
        for key in LAYERS:
            down, up = nn.Linear(hidden, rank, bias=False), nn.Linear(rank, hidden, bias=False)
            nn.init.normal_(down.weight, std=1 / rank)
            nn.init.zeros_(up.weight)
            state[f"{name}.{key}.down.weight"], state[f"{name}.{key}.up.weight"] = down.weight.data, up.weight.data
    return state


def flux_trained(transformer: nn.Module, rank: int, seed: int = 11) -> dict[str, torch.Tensor]:
    """Their state after training (random values), every key of their lora.pt."""
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) * 0.1 for k, v in flux_start(transformer, rank).items()}


def flux_run(folder: Path, model: Path, state: dict[str, torch.Tensor], rank: int, min_rank: int, tlora: bool = True,
             step: int = 10) -> Path:
    """A run folder as their FLUX code leaves it: logs/hparams.yml and checkpoint-<step>/lora.pt."""
    name = f"00001-61c6-dog_example_{'tlora' + str(rank) if tlora else 'lora'}"
    run = folder / name
    (run / "logs").mkdir(parents=True)
    (run / f"checkpoint-{step}").mkdir()
    hparams = FLUX_HPARAMS | {"rank": rank, "min_rank": min_rank, "tlora": tlora, "output_dir": str(run),
                              "pretrained_model_name_or_path": str(model), "exp_name": name,
                              "instance_data_dir": str(folder), "max_sequence_length": 16}
    (run / "logs" / "hparams.yml").write_text(yaml.dump(hparams))
    torch.save(state, run / f"checkpoint-{step}" / "lora.pt")
    return run


def their_rank(t: float, rank: int, min_rank: int, max_timestep: int = 1000) -> int:
    """Their FLUX pipeline's get_rank_by_timestep, on the float32 scheduler timestep as they call it."""
    timestep = torch.tensor(t, dtype=torch.float32)
    return int((max_timestep - timestep) * (rank - min_rank) / max_timestep) + min_rank


def their_flux_forward(transformer: nn.Module, state: dict[str, torch.Tensor], t: torch.Tensor, rank: int,
                       min_rank: int | None, **inputs) -> torch.Tensor:
    """The transformer's output with their FluxLoraAttnProcessor's LoRA terms: attn.to_q(x) + to_q_lora(x, mask)
    for q, k, v (every block), out and the text projections (double blocks), mask[:, :r(t)] = 1 (None: no mask),
    computed sample by sample with their formula."""
    paths = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0",
             "to_q_proj_lora": "add_q_proj", "to_k_proj_lora": "add_k_proj", "to_v_proj_lora": "add_v_proj"}
    mask = torch.ones(len(t), rank)
    if min_rank is not None:
        for i, value in enumerate(t.tolist()):
            mask[i, their_rank(value, rank, min_rank):] = 0
    hooks = []
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        name = next(n for n, m in transformer.named_modules() if m is block.attn)
        single = block in transformer.single_transformer_blocks
        for layer, path in paths.items():
            if single and layer not in ("to_q_lora", "to_k_lora", "to_v_lora"):
                continue  # their single-block forward uses q, k, v only
            down, up = state[f"{name}.processor.{layer}.down.weight"], state[f"{name}.processor.{layer}.up.weight"]
            linear = transformer.get_submodule(f"{name}.{path}")

            def add(module, args, output, down=down, up=up):
                h = args[0] @ down.T * mask[:, None, :]
                return output + h @ up.T

            hooks.append(linear.register_forward_hook(add))
    try:
        with torch.no_grad():
            return transformer(timestep=t / 1000, **inputs)[0]
    finally:
        for hook in hooks:
            hook.remove()
