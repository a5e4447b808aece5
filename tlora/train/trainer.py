"""The training run, top to bottom.

    trainer = Trainer(opts)   # accelerate, and the run folder (new, or the one resumed), locked
    trainer.setup()           # load_model, attach_adapters, make_optimizer, setup_data, start_tracking, restore
    trainer.train()           # the loop: a step, the loss log, checkpoints, validation images, clean stops

`train(opts)` does the three and turns whatever ends a run early into one line (RunFailed), removing a run
folder that never reached step 1 and keeping every finished checkpoint. The objective and optimizer
(objective), the loss log (loss_log) and checkpoint writing (checkpointing) are small modules of their own.
"""

from __future__ import annotations

import os
import signal
import warnings
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tlora.common.commands import save_traceback
from tlora.common.errors import Interrupted, RunFailed, Stopped, UsageError, first_line
from tlora.common.files import write_failure
from tlora.common.images import clip_frames, find_mask, list_images, training_images
from tlora.common.messages import WRITABLE_FOLDER, note, resume_with
from tlora.common.prompts import BASE_PROMPT, split_prompts
from tlora.families.pipelines import DTYPES, encoders_on, load_pipeline, offload_encoders
from tlora.generate import generation
from tlora.generate.api import compile_denoiser
from tlora.generate.generation import image_size
from tlora.generate.video import frames_kwargs
from tlora.method.injection import TLoRA
from tlora.runs.checkpoint_state import RESUME_DIR, Progress
from tlora.runs.hparams import from_hparams
from tlora.runs.reading import read
from tlora.runs.run_folder import (
    RunFolder,
    RunLock,
    checkpoint_step,
    create_run_folder,
    public_hparams,
    record_run,
    remove_run_folder,
)
from tlora.train.checkpointing import Checkpointer, last_good
from tlora.train.conditioning import Conditioning
from tlora.train.data import BatchOrder, PairedIndices
from tlora.train.loss_log import LOSS_FLUSH_STEPS, LossLog
from tlora.train.objective import diffusion_loss, make_optimizer
from tlora.train.options import TrainOptions
from tlora.train.stopping import StopSignals, terminate_as_interrupt
from tlora.train.timing import NULL_TIMER
from tlora.train.tracking import init_trackers, log_images, tracker


class Trainer:
    """One training run from parsed, checked options (a new run, or `opts.resume_checkpoint`'s run).

    `cache=False` re-encodes image and prompt every step with a new data iterator, as the authors' loop
    does; `pipe`, `adapter_state` and `timer` let the speed benchmarks (bench/) reuse a built model and time sections.
    """

    def __init__(self, opts: TrainOptions, cache: bool = True, pipe=None,
                 adapter_state: dict[str, torch.Tensor] | None = None, timer=NULL_TIMER) -> None:
        self.opts, self.cache, self.pipe, self.adapter_state, self.timer = opts, cache, pipe, adapter_state, timer
        # torchrun on a machine without CUDA: accelerate sets up gloo only when asked for the CPU.
        cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = Accelerator(mixed_precision=opts.mixed_precision, log_with=tracker(opts),
                                       project_config=ProjectConfiguration(), cpu=cpu)
        if self.accelerator.num_processes > 1:
            # DDP copies each adapter's (1, r) lambda gradient (a slice of the stacked lambda * mask scale)
            # into its bucket and warns once per process; the copy is of r numbers.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.resume_from: Path | None = opts.resume_checkpoint
        self.folder, self.lock = open_run(opts, self.accelerator, self.resume_from)
        self.run = RunFolder(self.folder)
        self.accelerator.project_configuration.project_dir = str(self.folder)
        self.accelerator.project_configuration.logging_dir = str(self.run.logs)
        self.device = self.accelerator.device
        self.weight_dtype = DTYPES[opts.mixed_precision]
        self.progress: Progress | None = None  # made in setup(); holds the step
        self.loss_log: LossLog | None = None

    @property
    def step_done(self) -> int:
        """Optimizer steps done (0 before setup; the checkpoint's step when resuming)."""
        return self.progress.step if self.progress is not None else 0

    @property
    def losses(self) -> list[float]:
        """Every loss read back so far."""
        return self.loss_log.values if self.loss_log is not None else []

    # -- set-up, step by step --------------------------------------------------------------------------
    def setup(self) -> None:
        self.load_model()
        self.attach_adapters()
        self.make_optimizer()
        self.setup_data()
        self.start_tracking()
        self.restore()

    def load_model(self) -> None:
        """The family's pipeline, frozen, on the device (a quantized denoiser stays where its backend put it)."""
        opts = self.opts
        if opts.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.pipe is None:
            self.pipe = load_pipeline(opts.pretrained_model_name_or_path, opts.pretrained_vae_model_name_or_path,
                                      opts.revision, self.weight_dtype, opts.recipe, opts.base_model_precision)
        self.family = opts.recipe
        for name, part in self.pipe.components.items():
            quantized = opts.base_model_precision != "auto" and name == self.family.model_attr
            if isinstance(part, torch.nn.Module) and not quantized:
                part.to(self.device)
        self.scheduler = self.family.noise_scheduler(self.pipe)

    def attach_adapters(self) -> None:
        """The adapters, from the seed (the authors' random start), a given state, or the checkpoint resumed."""
        opts, acc = self.opts, self.accelerator
        set_seed(opts.seed)
        self.settings = replace(from_hparams(vars(opts), "train.py"),
                                num_train_timesteps=self.scheduler.config.num_train_timesteps)
        fresh = self.adapter_state is None and self.resume_from is None
        self.tlora: TLoRA = self.family.attach(self.pipe, self.settings, init=fresh, svd_device=self.device)
        if self.adapter_state is not None:
            self.tlora.load_state_dict(self.adapter_state)
        if self.resume_from is not None:
            self.tlora.load_state_dict(read(self.resume_from, quiet=True).tensors())
        if acc.process_index > 0:  # every process its own noise and timesteps; process 0 draws as a single one
            set_seed(opts.seed + acc.process_index)
        if opts.gradient_checkpointing:
            self.family.model(self.pipe).enable_gradient_checkpointing()
        if opts.compile:  # after the hooks and checkpointing are in place, so that the graph holds them
            compile_denoiser(self.tlora)

    def make_optimizer(self) -> None:
        self.optimizer = make_optimizer(self.opts, self.tlora.trainable_parameters())
        if len(self.tlora.spec.entries) > 1:  # models called one at a time (Wan 2.2's experts): a step may use one
            self.accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.model, self.optimizer = self.accelerator.prepare(self.family.model(self.pipe), self.optimizer)
        self.model.train()

    def setup_data(self) -> None:
        """What each step conditions on (cached: encoded once, then the encoders leave the GPU) and in which order."""
        opts = self.opts
        concept = f"{opts.placeholder_token} {opts.class_name}"
        class_images = list_images(opts.class_data_dir) if opts.with_prior_preservation else []
        images = training_images(opts.train_data_dir, opts.one_image, clip_frames(self.family) is not None)
        masks = [find_mask(opts.mask_dir, image) for image in images] if opts.mask_dir else None
        self.conditioning = Conditioning(
            self.family, self.pipe, images, BASE_PROMPT.format(concept), opts.resolution, self.device, class_images,
            BASE_PROMPT.format(opts.class_name), cache=self.cache, timer=self.timer,
            masks=images if opts.alpha_mask else masks, max_sequence_length=opts.max_sequence_length,
            alpha_masks=opts.alpha_mask,
        )
        indices = PairedIndices(len(self.conditioning.images["instance"]), len(class_images))
        seed = opts.seed + self.accelerator.process_index
        self.loader = DataLoader(indices, batch_size=opts.train_batch_size, shuffle=True,
                                 generator=torch.Generator().manual_seed(seed),
                                 num_workers=0 if self.cache else opts.dataloader_num_workers)
        self.order = BatchOrder(self.loader, fresh=not self.cache)
        if self.cache:  # nothing encodes during training any more: free the accelerator's memory
            offload_encoders(self.family, self.pipe)

    def start_tracking(self) -> None:
        """Trackers, the loss log, the resume state's extra piece (Progress) and the checkpointer."""
        acc, opts = self.accelerator, self.opts
        try:
            init_trackers(acc, opts, public_hparams(opts), self.run.logs)
        except Exception as err:  # a project name W&B refuses, no login, a tracker that cannot start
            raise RunFailed(f"--report_to {tracker(opts)}: the tracker did not start ({first_line(err)}); check "
                            "--project_name and the tracker's login, or pass --report_to none") from err
        self.progress = Progress(self.order, acc)
        # The adapters are saved as pytorch_lora_weights.safetensors and the progress as progress.safetensors;
        # accelerate keeps the rest (optimizer, RNG states), not the model.
        acc.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
        acc.register_load_state_pre_hook(lambda models, folder: models.clear())
        metadata = (self.settings.to_metadata() | self.family.model_metadata(self.family.model(self.pipe))
                    | {"pretrained_model_name_or_path": opts.pretrained_model_name_or_path})
        self.checkpoints = Checkpointer(acc, self.folder, self.tlora, self.progress, metadata, opts)
        self.loss_log = LossLog(acc, self.run.loss_log, self.checkpoints.last_good)

    def restore(self) -> None:
        """When resuming: accelerate's state (optimizer, RNGs), the progress and loss.csv up to the checkpoint
        (every file checked before the model loaded: runs.checkpoint_state.why_not_resumable)."""
        if self.resume_from is not None:
            self.accelerator.load_state(str(self.resume_from / RESUME_DIR))
            self.progress.load(self.resume_from / RESUME_DIR)
            if self.accelerator.is_main_process:
                self.loss_log.keep_until(self.step_done)

    # -- the loop ------------------------------------------------------------------------------------
    def batches(self):
        """Index batches for ever (cached: one pass after another; uncached: a new iterator per step)."""
        return self.order

    def step(self, indices: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step; returns the detached loss (still on the device)."""
        opts, acc = self.opts, self.accelerator
        with self.timer("data"):
            batch = self.conditioning.batch(indices)
        prior = opts.prior_loss_weight if opts.with_prior_preservation else None
        with self.timer("denoiser"):
            with acc.autocast():
                loss = diffusion_loss(self.family, self.model, self.pipe, self.scheduler, batch, self.weight_dtype,
                                      prior, opts.guidance_scale)
            acc.backward(loss)
        with self.timer("optimizer"):
            if opts.max_grad_norm:
                acc.clip_grad_norm_(self.tlora.trainable_parameters(), opts.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def train(self) -> Path:
        """Every step from the current one, with checkpoints and validation images; returns the run folder. The
        first SIGINT/SIGTERM stops after the current step with a resumable checkpoint."""
        total, acc = self.opts.num_train_epochs, self.accelerator
        bar = tqdm(total=total, initial=self.step_done, desc="training", disable=not acc.is_local_main_process)
        self.loss_log.bar = bar
        with StopSignals() as signals, closing(bar):  # closed however the loop ends: a failure's line comes after
            for step in range(self.step_done + 1, total + 1):
                with self.timer("data"):
                    indices = next(self.order)
                loss = self.step(indices)
                self.progress.step = step
                bar.update(1)
                checkpoint = step % self.opts.checkpointing_steps == 0 or step == total
                stop = signals.requested(acc, due=checkpoint or step % LOSS_FLUSH_STEPS == 0)
                self.loss_log.add(loss, step, now=checkpoint or stop)
                if checkpoint or stop:
                    folder = self.checkpoints.save(step)
                    if not stop:
                        self.validate(folder, step)
                    acc.wait_for_everyone()
                if stop and step < total:  # a signal during the last step: the run is complete anyway
                    bar.close()
                    self.end()
                    raise Interrupted(stop, step, folder)
        self.end()
        return self.folder

    def end(self) -> None:
        """End the trackers and the process group, the DDP wrapper first. A DDP reducer freed after the group is
        destroyed is the group's last owner and tears it down holding the GIL, while gloo's threads may need the
        GIL to free a collective's tensors: with several processes on the CPU that deadlocks now and then."""
        self.model = self.optimizer = None
        self.accelerator.free_memory()
        self.accelerator.end_training()

    def validate(self, checkpoint: Path, step: int) -> None:
        """Sample the validation prompts with inference.py's defaults for the family and seed 0, with the
        pipeline being trained (no copy). Runs on a forked RNG, so that training draws the same noise with or
        without validation."""
        opts, family = self.opts, self.family
        if not (opts.validation_prompts and self.accelerator.is_main_process):
            return
        steps, guidance = family.inference_steps, family.inference_guidance
        cfg = generation.Sampling(
            opts.placeholder_token, opts.class_name, family.samples_folder(checkpoint, steps, guidance, 0),
            num_images_per_prompt=opts.num_val_imgs_per_prompt, num_inference_steps=steps, guidance_scale=guidance,
            replace=True, call_kwargs=family.call_kwargs(vars(opts))
            | image_size(("--validation_height", "--validation_width"), opts.validation_height, opts.validation_width,
                         family.resolution_multiple)
            | frames_kwargs("--validation_num_frames", opts.validation_num_frames, family),
            guidance_arg=family.guidance_arg,
        )
        self.model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        encoders = encoders_on(self.family, self.pipe, self.device)
        with torch.random.fork_rng(devices=devices), self.accelerator.autocast(), encoders:
            images = generation.run(self.pipe, split_prompts(opts.validation_prompts), cfg, str(checkpoint))
        self.model.train()
        log_images(self.accelerator, {cfg.text(t): imgs for t, imgs in images.items()}, step)


def open_run(opts: TrainOptions, accelerator: Accelerator, resume_from: Path | None) -> tuple[Path, RunLock | None]:
    """The run folder, made (or, when resuming, recorded) and locked on the main process; every process gets
    its path."""
    folder, lock = [None], None
    if accelerator.is_main_process:
        folder = [create_run_folder(opts) if resume_from is None else resume_from.parent]
        run = RunFolder(folder[0])
        lock = run.lock().acquire()
        try:
            if resume_from is not None and (old := run.moved_from(run.hparams())):
                note(f"{folder[0].name} was written in {old}; resuming it where it is, {folder[0]}")
            resumed = None if resume_from is None else checkpoint_step(resume_from)
            record_run(opts, folder[0], resumed, wandb=tracker(opts) == "wandb")
        except OSError as err:
            lock.release()
            raise UsageError(f"--output_dir: {write_failure(err, folder[0])}; {WRITABLE_FOLDER}") from None
        except BaseException:
            lock.release()
            raise
    folder = broadcast_object_list(folder)
    opts.exp_name, opts.output_dir, opts.logging_dir = folder[0].name, str(folder[0]), str(RunFolder(folder[0]).logs)
    return folder[0], lock


# -- a whole run, and how it ends ------------------------------------------------------------------------
def train(opts: TrainOptions, cache: bool = True) -> Path:
    """Train from checked options; returns the run folder. Whatever ends it early is one line (RunFailed,
    Interrupted); a new run folder that a failure leaves before its first step is removed, and every
    checkpoint finished before is kept."""
    with terminate_as_interrupt():  # a SIGTERM while loading cleans up as Ctrl-C does; the loop has its own handler
        trainer = Trainer(opts, cache=cache)
        try:
            trainer.setup()
            return trainer.train()
        except BaseException as err:
            ended = _ended_early(trainer, err)
            if ended is err:
                raise
            raise ended from err
        finally:
            if trainer.lock is not None:
                trainer.lock.release()


def _ended_early(trainer: Trainer, err: BaseException) -> BaseException:
    """Clean up after a run that ended early and say so in one line: the trackers are ended, a run folder that
    never reached step 1 is removed; Ctrl-C and unforeseen errors become RunFailed (the traceback in a file)."""
    started = trainer.resume_from is not None or trainer.step_done > 0
    if not isinstance(err, Interrupted):  # (Interrupted ended the trackers already)
        try:
            trainer.end()
        except Exception:  # a tracker that never started; the run's failure is what to report
            pass
        if not started and trainer.accelerator.is_main_process:
            remove_run_folder(trainer.folder)
    if isinstance(err, (Interrupted, RunFailed, UsageError)) or not isinstance(err, (Exception, KeyboardInterrupt)):
        return err
    newest = last_good(trainer.folder) if started else f"nothing was kept ({trainer.folder} is removed)"
    if isinstance(err, KeyboardInterrupt):
        signum = getattr(err, "signum", signal.SIGINT)
        if not started:
            return Stopped(f"stopped at once before step 1 ({signal.Signals(signum).name}); {newest}: run the command "
                           "again to start", signum)
        return Stopped(f"stopped at once at step {trainer.step_done}; {newest}; resume with "
                       f"--resume_from_checkpoint {trainer.folder}", signum)
    path = save_traceback(err, trainer.run.logs / "error.txt" if started else None)
    fix = resume_with(trainer.folder) if started else "run the command again"
    return RunFailed(f"training failed at step {trainer.step_done}: {type(err).__name__}: {first_line(err)} "
                     f"(traceback in {path}); {newest}; fix the cause, then {fix}")
