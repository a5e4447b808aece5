"""The training run: set-up through accelerate, the loss of one step, the loop, checkpoints, validation."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import families, generation
from .checkpoint import atomic_write, save_weights
from .conditioning import BASE_PROMPT, Conditioning
from .data import BatchOrder, PairedIndices, find_mask, list_images, training_images
from .injection import TLoRA, attach
from .models import DTYPES, encoders_on, load_pipeline, offload_encoders
from .options import tracker, wandb_key
from .reading import read
from .resume import RESUME_DIR, Progress, checkpoint_step, prune, write_checkpoint
from .run_folder import create_run_folder, public_hparams, record_run, remove_run_folder
from .settings import TLoRASettings
from .stopping import Interrupted, StopSignals
from .timing import NULL_TIMER
from .tracking import init_trackers, log_images
from .usage import redact_argv

LOSS_FLUSH_STEPS = 10  # losses are read back from the device in groups, not every step


def diffusion_loss(
    model, pipe, scheduler, batch: dict[str, torch.Tensor], dtype: torch.dtype, prior_weight: float | None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """MSE between the denoiser's prediction and its family's target for fresh noise and timesteps.

    With a `mask` in the batch (--mask_dir), prediction and target are multiplied by it first.
    With `prior_weight`, the second half of the batch is class images: loss = instance + weight * class.
    """
    pred, target = families.of_model(pipe).predict(model, pipe, scheduler, batch, dtype, guidance)
    pred, target = pred.float(), target.float()
    if "mask" in batch:
        pred, target = pred * batch["mask"], target * batch["mask"]
    if prior_weight is None:
        return F.mse_loss(pred, target)
    pred, prior_pred = pred.chunk(2)
    target, prior_target = target.chunk(2)
    return F.mse_loss(pred, target) + prior_weight * F.mse_loss(prior_pred, prior_target)


def _run_folder(args: argparse.Namespace, accelerator: Accelerator, resume_from: Path | None) -> Path:
    """The run folder, made (or, when resuming, recorded) on the main process; every process gets its path."""
    folder = [None]
    if accelerator.is_main_process:
        if resume_from is None and args.resume_from_checkpoint == "latest":
            print(f"--resume_from_checkpoint latest: no run to resume in {args.output_dir}; starting a new run")
        folder = [create_run_folder(args) if resume_from is None else resume_from.parent]
        resumed = None if resume_from is None else checkpoint_step(resume_from)
        record_run(args, folder[0], resumed, wandb=tracker(args) == "wandb")
    folder = broadcast_object_list(folder)
    args.exp_name, args.output_dir, args.logging_dir = folder[0].name, str(folder[0]), str(folder[0] / "logs")
    return folder[0]


def make_optimizer(args: argparse.Namespace, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Constant learning rate. AdamW: bitsandbytes' 8-bit version with --use_8bit_adam, else torch's fused
    kernel (one pass over all adapter tensors; 2.5x faster than the default on the CPU too).
    Prodigy (the authors' FLUX default; learning rate 1.0 means Prodigy's own step size)."""
    hyper = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                 weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, **hyper)
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **hyper)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, fused=fused, **hyper)


class Trainer:
    """One training run from parsed, validated options (a new run, or `args.resume_checkpoint`'s run).

    `cache=False` re-encodes image and prompt every step with a new data iterator, as the authors' loop
    does; `pipe`, `adapter_state` and `timer` let the benchmark reuse a built model and time sections.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        cache: bool = True,
        pipe=None,
        adapter_state: dict[str, torch.Tensor] | None = None,
        timer=NULL_TIMER,
    ) -> None:
        self.args, self.cache, self.pipe, self.adapter_state, self.timer = args, cache, pipe, adapter_state, timer
        key = wandb_key(args)
        if key:  # in-process only: never written to disk, never in argv records
            os.environ["WANDB_API_KEY"] = key
        sys.argv[:] = redact_argv(sys.argv)
        # torchrun on a machine without CUDA: accelerate sets up gloo only when asked for the CPU.
        cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = Accelerator(
            mixed_precision=args.mixed_precision, log_with=tracker(args), project_config=ProjectConfiguration(), cpu=cpu
        )
        if self.accelerator.num_processes > 1:
            # DDP copies each adapter's (1, r) lambda gradient (a slice of the stacked lambda * mask scale)
            # into its bucket and warns once per process; the copy is of r numbers.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.resume_from: Path | None = getattr(args, "resume_checkpoint", None)
        self.folder = _run_folder(args, self.accelerator, self.resume_from)
        self.accelerator.project_configuration.project_dir = str(self.folder)
        self.accelerator.project_configuration.logging_dir = str(self.folder / "logs")
        self.device = self.accelerator.device
        self.weight_dtype = DTYPES[args.mixed_precision]
        self.losses: list[float] = []
        self.progress: Progress | None = None  # made in setup(); holds the step

    @property
    def step_done(self) -> int:
        """Optimizer steps done (0 before setup; the checkpoint's step when resuming)."""
        return self.progress.step if self.progress is not None else 0

    def setup(self) -> None:
        args, acc = self.args, self.accelerator
        if args.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.pipe is None:
            self.pipe = load_pipeline(
                args.pretrained_model_name_or_path, args.pretrained_vae_model_name_or_path, args.revision,
                self.weight_dtype, args.family, args.base_model_precision,
            )
        self.family = families.of_model(self.pipe)
        if args.base_model_precision == "auto":  # quantized weights are placed by their backend
            self.pipe.to(self.device)
        else:
            for name, part in self.pipe.components.items():
                if isinstance(part, torch.nn.Module) and name != self.family.model_attr:
                    part.to(self.device)
        self.scheduler = self.family.noise_scheduler(self.pipe)
        set_seed(args.seed)
        self.settings = replace(TLoRASettings.from_hparams(vars(args), "train.py"),
                                num_train_timesteps=self.scheduler.config.num_train_timesteps)
        self.tlora: TLoRA = attach(self.family.model(self.pipe), self.settings,
                                   init=self.adapter_state is None and self.resume_from is None, svd_device=self.device)
        if self.adapter_state is not None:
            self.tlora.load_state_dict(self.adapter_state)
        if self.resume_from is not None:
            self.tlora.load_state_dict(read(self.resume_from, quiet=True).tensors())
        if acc.process_index > 0:  # every process its own noise and timesteps; process 0 draws as a single one
            set_seed(args.seed + acc.process_index)
        if args.gradient_checkpointing:
            self.family.model(self.pipe).enable_gradient_checkpointing()
        self.optimizer = make_optimizer(args, self.tlora.trainable_parameters())
        self.model, self.optimizer = acc.prepare(self.family.model(self.pipe), self.optimizer)
        self.model.train()
        self._setup_data()
        if self.cache:  # nothing encodes during training any more: free the accelerator's memory
            offload_encoders(self.pipe)
        init_trackers(acc, args, public_hparams(args), self.folder / "logs")
        self.progress = Progress(self.order, acc)
        acc.register_for_checkpointing(self.progress)
        # The adapters are saved as pytorch_lora_weights.safetensors; accelerate keeps the rest, not the model.
        acc.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
        acc.register_load_state_pre_hook(lambda models, folder: models.clear())
        if self.resume_from is not None:
            acc.load_state(str(self.resume_from / RESUME_DIR))
            if acc.is_main_process:
                keep_losses(self.folder / "logs" / "loss.csv", self.step_done)

    def _setup_data(self) -> None:
        args = self.args
        concept = f"{args.placeholder_token} {args.class_name}"
        class_images = list_images(args.class_data_dir) if args.with_prior_preservation else []
        images = training_images(args.train_data_dir, args.one_image)
        masks = [find_mask(args.mask_dir, image) for image in images] if args.mask_dir else None
        self.conditioning = Conditioning(
            self.pipe, images, BASE_PROMPT.format(concept), args.resolution, self.device, class_images,
            BASE_PROMPT.format(args.class_name), cache=self.cache, timer=self.timer, masks=masks,
            max_sequence_length=args.max_sequence_length,
        )
        indices = PairedIndices(len(self.conditioning.images["instance"]), len(class_images))
        seed = args.seed + self.accelerator.process_index
        self.loader = DataLoader(
            indices, batch_size=args.train_batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
            num_workers=0 if self.cache else args.dataloader_num_workers,
        )
        self.order = BatchOrder(self.loader, fresh=not self.cache)

    def batches(self):
        """Index batches for ever (cached: one pass after another; uncached: a new iterator per step)."""
        return self.order

    def step(self, indices: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step; returns the detached loss (still on the device)."""
        with self.timer("data"):
            batch = self.conditioning.batch(indices)
        prior = self.args.prior_loss_weight if self.args.with_prior_preservation else None
        with self.timer("unet"):
            with self.accelerator.autocast():
                loss = diffusion_loss(self.model, self.pipe, self.scheduler, batch, self.weight_dtype, prior,
                                      self.args.guidance_scale)
            self.accelerator.backward(loss)
        with self.timer("optimizer"):
            if self.args.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.tlora.trainable_parameters(), self.args.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def train(self) -> Path:
        """Run every step from the current one, writing checkpoints and validation images; returns the run
        folder. The first SIGINT/SIGTERM stops after the current step with a resumable checkpoint."""
        args, total, acc = self.args, self.args.num_train_epochs, self.accelerator
        bar = tqdm(total=total, initial=self.step_done, desc="training", disable=not acc.is_local_main_process)
        pending: list[torch.Tensor] = []
        with StopSignals() as signals:
            for step in range(self.step_done + 1, total + 1):
                with self.timer("data"):
                    indices = next(self.order)
                pending.append(self.step(indices))
                self.progress.step = step
                bar.update(1)
                checkpoint = step % args.checkpointing_steps == 0 or step == total
                stop = signals.requested(acc)
                if step % LOSS_FLUSH_STEPS == 0 or checkpoint or stop:
                    self._flush_losses(pending, step, bar)
                    pending = []
                if checkpoint or stop:
                    folder = self.save_checkpoint(step, validate=not stop)
                if stop and step < total:  # a signal during the last step: the run is complete anyway
                    bar.close()
                    acc.end_training()
                    raise Interrupted(stop, step, folder)
        bar.close()
        acc.end_training()
        return self.folder

    def _flush_losses(self, losses: list[torch.Tensor], last_step: int, bar: tqdm) -> None:
        """Read back losses (the mean over processes) for trackers, loss.csv and the progress bar."""
        stacked = torch.stack(losses).float()
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.gather(stacked).reshape(self.accelerator.num_processes, -1).mean(0)
        values = stacked.cpu().tolist()
        first = last_step - len(values) + 1
        for i, value in enumerate(values):
            self.accelerator.log({"loss": value}, step=first + i)
        if self.accelerator.is_main_process:
            loss_csv = self.folder / "logs" / "loss.csv"
            new = not loss_csv.exists()
            with open(loss_csv, "a") as f:
                f.write(("step,loss\n" if new else "") + "".join(f"{first + i},{v}\n" for i, v in enumerate(values)))
        self.losses.extend(values)
        bar.set_postfix(loss=f"{values[-1]:.4f}")

    def save_checkpoint(self, step: int, validate: bool = True) -> Path:
        """checkpoint-<step>: the weights, the resume state, then validation images if prompts were given.
        Older checkpoints and resume states beyond the limits are removed once this one is complete."""
        acc = self.accelerator
        self._check_replicas()
        meta = self.settings.to_metadata() | {
            "pretrained_model_name_or_path": self.args.pretrained_model_name_or_path, "global_step": step}
        folder = write_checkpoint(acc, self.progress, self.folder / f"checkpoint-{step}",
                                  lambda staging: save_weights(self.tlora.state_dict(), staging, meta))
        if acc.is_main_process:
            prune(self.folder, self.args.checkpoints_total_limit, self.args.resume_state_total_limit)
            if validate and self.args.validation_prompts:
                self.validate(folder, step)
        acc.wait_for_everyone()
        return folder

    def _check_replicas(self) -> None:
        """Every process must hold the same adapters (DDP averages gradients); a mismatch is a bug."""
        if self.accelerator.num_processes == 1:
            return
        total = torch.stack([p.detach().double().sum() for p in self.tlora.trainable_parameters()]).sum()
        sums = self.accelerator.gather(total[None].to(self.device))
        if not torch.all(sums == sums[0]):
            raise RuntimeError(f"adapters differ between processes: {sums.tolist()}")

    def validate(self, checkpoint: Path, step: int) -> None:
        """Sample the validation prompts with inference.py's defaults for the family (SDXL: 25 steps,
        guidance 5.0; FLUX: 28 steps, guidance 3.5; seed 0) with the pipeline being trained (no copy).
        Runs on a forked RNG, so that training draws the same noise with or without validation."""
        args, family = self.args, self.family
        steps, guidance = family.inference_steps, family.inference_guidance
        cfg = generation.Sampling(
            args.placeholder_token, args.class_name, family.samples_folder(checkpoint, steps, guidance, 0),
            num_images_per_prompt=args.num_val_imgs_per_prompt, num_inference_steps=steps, guidance_scale=guidance,
            replace=True, call_kwargs=generation.call_kwargs(family.name, vars(args)),
        )
        self.model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.accelerator.autocast(), encoders_on(self.pipe, self.device):
            images = generation.run(self.pipe, generation.split_prompts(args.validation_prompts), cfg, str(checkpoint))
        self.model.train()
        log_images(self.accelerator, {cfg.text(t): imgs for t, imgs in images.items()}, step)


def keep_losses(loss_csv: Path, last_step: int) -> None:
    """Drop rows after `last_step` from loss.csv (written after the checkpoint a run resumes from)."""
    if not loss_csv.is_file():
        return
    lines = loss_csv.read_text().splitlines()
    kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) <= last_step]
    atomic_write(loss_csv, ("\n".join(kept) + "\n").encode())


def train(args: argparse.Namespace, cache: bool = True) -> Path:
    """Train from validated options; returns the run folder. A new run folder that a failure (or Ctrl-C)
    leaves before its first step is removed."""
    trainer = Trainer(args, cache=cache)
    try:
        trainer.setup()
        return trainer.train()
    except BaseException as err:
        if trainer.resume_from is None and trainer.step_done == 0 and not isinstance(err, Interrupted):
            trainer.accelerator.end_training()
            if trainer.accelerator.is_main_process:
                remove_run_folder(trainer.folder)
        raise
