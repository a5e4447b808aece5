"""The training run: set-up through accelerate, the loss of one step, the loop, checkpoints, validation."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import traceback
import warnings
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tlora import families
from tlora.common.errors import Diverged, Interrupted, RunFailed, Stopped, UsageError, first_line
from tlora.common.files import atomic_write
from tlora.common.images import find_mask, list_images, training_images
from tlora.common.prompts import BASE_PROMPT, split_prompts
from tlora.common.usage import redact_argv
from tlora.families.pipelines import DTYPES, encoders_on, load_pipeline, offload_encoders
from tlora.generate import generation
from tlora.method.injection import TLoRA, attach
from tlora.method.settings import TLoRASettings
from tlora.runs.checkpoint_state import RESUME_DIR, Progress, checkpoint_step, prune, write_checkpoint
from tlora.runs.reading import read, weights_file
from tlora.runs.run_folder import (
    RunLock,
    checkpoints,
    create_run_folder,
    moved_from,
    public_hparams,
    read_hparams,
    record_run,
    remove_run_folder,
)
from tlora.runs.weights import save_weights
from tlora.train.conditioning import Conditioning
from tlora.train.data import BatchOrder, PairedIndices
from tlora.train.stopping import StopSignals, terminate_as_interrupt
from tlora.train.timing import NULL_TIMER
from tlora.train.tracking import init_trackers, log_images, tracker, wandb_key

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


def _run_folder(args: argparse.Namespace, accelerator: Accelerator, resume_from: Path | None
                ) -> tuple[Path, RunLock | None]:
    """The run folder, made (or, when resuming, recorded) and locked on the main process; every process gets
    its path."""
    folder, lock = [None], None
    if accelerator.is_main_process:
        if args.resume_note:
            print(f"note: {args.resume_note}", file=sys.stderr)
        folder = [create_run_folder(args) if resume_from is None else resume_from.parent]
        lock = RunLock(folder[0]).acquire()
        try:
            if resume_from is not None and (old := moved_from(folder[0], read_hparams(folder[0] / "logs" / "hparams.yml"))):
                print(f"note: {folder[0].name} was written in {old}; resuming it where it is, {folder[0]}",
                      file=sys.stderr)
            resumed = None if resume_from is None else checkpoint_step(resume_from)
            record_run(args, folder[0], resumed, wandb=tracker(args) == "wandb")
        except BaseException:
            lock.release()
            raise
    folder = broadcast_object_list(folder)
    args.exp_name, args.output_dir, args.logging_dir = folder[0].name, str(folder[0]), str(folder[0] / "logs")
    return folder[0], lock


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
        args.resume_note = getattr(args, "resume_note", None)
        self.folder, self.lock = _run_folder(args, self.accelerator, self.resume_from)
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
        try:
            init_trackers(acc, args, public_hparams(args), self.folder / "logs")
        except Exception as err:  # a project name W&B refuses, no login, a tracker that cannot start
            raise RunFailed(f"--report_to {tracker(args)}: the tracker did not start ({first_line(err)}); check "
                            "--project_name and the tracker's login, or pass --report_to none") from err
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
        if args.alpha_mask:
            masks = images  # each image's own transparency
        self.conditioning = Conditioning(
            self.pipe, images, BASE_PROMPT.format(concept), args.resolution, self.device, class_images,
            BASE_PROMPT.format(args.class_name), cache=self.cache, timer=self.timer, masks=masks,
            max_sequence_length=args.max_sequence_length, alpha_masks=args.alpha_mask,
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
        with StopSignals() as signals, closing(bar):  # closed however the loop ends: a failure's line comes after
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
        acc.end_training()
        return self.folder

    def _flush_losses(self, losses: list[torch.Tensor], last_step: int, bar: tqdm) -> None:
        """Read back losses (the mean over processes) for trackers, loss.csv and the progress bar; a loss that is
        not finite stops the run (Diverged) once they are recorded."""
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
        bad = next(((first + i, v) for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise Diverged(f"training diverged: the loss is {bad[1]} at step {bad[0]}; {self._last_good()}; "
                           "lower --learning_rate (or set --max_grad_norm) and start a new run")

    def _last_good(self) -> str:
        """Where the newest finite checkpoint is (every checkpoint written is finite)."""
        found = [folder for _, folder in checkpoints(self.folder) if weights_file(folder)]
        return f"the newest finite checkpoint is {found[-1]}" if found else "no checkpoint was written yet"

    def _check_finite(self, step: int) -> None:
        """The adapters hold finite numbers (one reduction, at checkpoints only); else stop before writing."""
        params = self.tlora.trainable_parameters()
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise Diverged(f"training diverged: the adapter weights are not finite after step {step}; "
                           f"{self._last_good()}; lower --learning_rate (or set --max_grad_norm) and start a new run")

    def save_checkpoint(self, step: int, validate: bool = True) -> Path:
        """checkpoint-<step>: the weights, the resume state, then validation images if prompts were given.
        Older checkpoints and resume states beyond the limits are removed once this one is complete."""
        acc = self.accelerator
        self._check_finite(step)
        self._check_replicas()
        meta = self.settings.to_metadata() | {
            "pretrained_model_name_or_path": self.args.pretrained_model_name_or_path, "global_step": step}
        try:
            folder = write_checkpoint(acc, self.progress, self.folder / f"checkpoint-{step}",
                                      lambda staging: save_weights(self.tlora.state_dict(), staging, meta))
        except OSError as err:  # a full disk, a folder that went away
            raise RunFailed(f"could not write checkpoint-{step} in {self.folder} ({err.strerror or err}); every "
                            f"finished checkpoint is whole: free some space and resume with --resume_from_checkpoint "
                            f"{self.folder}") from err
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
            replace=True, call_kwargs=family.call_kwargs(vars(args)),
        )
        self.model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.accelerator.autocast(), encoders_on(self.pipe, self.device):
            images = generation.run(self.pipe, split_prompts(args.validation_prompts), cfg, str(checkpoint))
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
    """Train from validated options; returns the run folder. Whatever ends it early is one line (RunFailed,
    Interrupted); a new run folder that a failure leaves before its first step is removed, and every
    checkpoint finished before is kept."""
    with terminate_as_interrupt():  # a SIGTERM while loading cleans up as Ctrl-C does; the loop has its own handler
        return _train(Trainer(args, cache=cache))


def _train(trainer: Trainer) -> Path:
    try:
        trainer.setup()
        return trainer.train()
    except BaseException as err:
        started = trainer.resume_from is not None or trainer.step_done > 0
        if not isinstance(err, Interrupted):  # (Interrupted ended the trackers already)
            try:
                trainer.accelerator.end_training()
            except Exception:  # a tracker that never started; the run's failure is what to report
                pass
            if not started and trainer.accelerator.is_main_process:
                remove_run_folder(trainer.folder)
        if isinstance(err, (Interrupted, RunFailed, UsageError)) or not isinstance(err, (Exception, KeyboardInterrupt)):
            raise
        raise _one_line(err, trainer, started) from err
    finally:
        if trainer.lock is not None:
            trainer.lock.release()


def _one_line(err: BaseException, trainer: Trainer, started: bool) -> RunFailed:
    """Ctrl-C, or an error nobody foresaw, as one line; the traceback goes to a file that the line names."""
    newest = trainer._last_good() if started else f"nothing was kept ({trainer.folder} is removed)"
    if isinstance(err, KeyboardInterrupt):
        signum = getattr(err, "signum", signal.SIGINT)
        if not started:
            return Stopped(f"stopped at once before step 1 ({signal.Signals(signum).name}); {newest}: run the command "
                           "again to start", signum)
        return Stopped(f"stopped at once at step {trainer.step_done}; {newest}; resume with "
                       f"--resume_from_checkpoint {trainer.folder}", signum)
    if started:
        path = trainer.folder / "logs" / "error.txt"
    else:
        fd, name = tempfile.mkstemp(prefix="tlora-error-", suffix=".txt")
        os.close(fd)
        path = Path(name)
    path.write_text("".join(traceback.format_exception(err)))
    return RunFailed(f"training failed at step {trainer.step_done}: {type(err).__name__}: {first_line(err)} "
                     f"(traceback in {path}); {newest}")
