"""train.py end to end on the tiny SDXL: folders, hparams.yml, checkpoints, tracking, prior preservation."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tlora.train.options import parse_args

from helpers import REPO, SHARED, read_weights, train_args
from wandb_log import history

RUN_NAME = re.compile(r"^(\d{5})-([0-9a-f]{4})-(.+)$")


def launch(argv, env=None, accelerate=True):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"] if accelerate else [sys.executable]
    done = subprocess.run(cmd + [str(REPO / "train.py"), *argv], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def only_run(out: Path) -> Path:
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    return runs[-1]


@pytest.mark.parametrize(
    "trainer_type, trainer_class, suffix",
    [("ortho_lora", "sdxl_tlora", "tortho_lora4"), ("lora", "sdxl_tlora", "tlora4"),
     ("ortho_lora", "sdxl_lora", "ortho_lora4"), ("lora", "sdxl_lora", "lora4")],
)
@pytest.mark.slow
def test_training_writes_the_documented_tree(tiny_sdxl, image_dir, tmp_path, trainer_type, trainer_class, suffix):
    """`accelerate launch train.py` for T-LoRA (the documented command, with validation images); the three other
    kinds in this process (the same code after the launcher)."""
    launched = suffix == "tortho_lora4"
    validation = ["--validation_prompts", "a {0} on the beach#a red {0}", "--num_val_imgs_per_prompt", "2"]
    argv = train_args(tiny_sdxl, image_dir, tmp_path / "out", "--trainer_type", trainer_type,
                      "--trainer_class", trainer_class, *(validation if launched else []))
    if launched:
        done = launch(argv)
        assert "torchvision" not in done.stderr  # transformers' notice on every import is silenced
    else:
        from tlora.train.trainer import train

        train(parse_args(argv))
    run = only_run(tmp_path / "out")
    m = RUN_NAME.match(run.name)
    assert m and m.group(1) == "00001" and m.group(3) == f"{image_dir.name}_{suffix}"
    if launched:
        assert f"run folder: {run}" in done.stdout
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "checkpoint-3", "logs"]
    hp = yaml.safe_load((run / "logs" / "hparams.yml").read_text())
    assert hp["output_dir"] == str(run) and hp["exp_name"] == run.name and hp["logging_dir"] == str(run / "logs")
    assert hp["trainer_type"] == trainer_type and hp["lora_rank"] == 4
    assert hp["argv"][1].endswith("train.py") or not launched
    authors_keys = {"trainer_type", "trainer_class", "project_name", "wandb_api_key", "seed",
                    "pretrained_model_name_or_path", "mixed_precision", "revision", "num_train_epochs",
                    "checkpointing_steps", "train_data_dir", "train_batch_size", "dataloader_num_workers",
                    "resolution", "output_dir", "class_data_dir", "prior_loss_weight", "with_prior_preservation",
                    "class_name", "placeholder_token", "validation_prompts", "num_val_imgs_per_prompt", "lora_rank",
                    "min_rank", "sig_type", "alpha_rank_scale", "learning_rate", "adam_beta1", "adam_beta2",
                    "adam_weight_decay", "adam_epsilon", "one_image", "argv", "exp_name", "logging_dir"}
    assert authors_keys <= hp.keys()
    for step in (2, 3):
        ckpt = run / f"checkpoint-{step}"
        tensors, meta = read_weights(ckpt)
        assert meta["global_step"] == str(step) and meta["trainer_class"] == trainer_class
        assert (meta["max_rank"], meta["min_rank"], meta["alpha"]) == ("4", "2", "1.0")  # the ComfyUI-T-LoRA fields
        samples = ckpt / "samples" / "ns25_gs5.0" / "version_0"
        assert sorted(p.name for p in ckpt.iterdir()) == ["pytorch_lora_weights.safetensors"] + \
            (["resume"] if step == 3 else []) + (["samples"] if launched else [])
        if launched:
            assert sorted(p.name for p in samples.iterdir()) == ["a red sks", "a sks on the beach", "prompts.yaml"]
            assert sorted(p.name for p in (samples / "a red sks").iterdir()) == ["0.png", "1.png", "grid.png"]
    first, last = read_weights(run / "checkpoint-2")[0], read_weights(run / "checkpoint-3")[0]
    trained = "q_layer.weight" if trainer_type == "ortho_lora" else "up.weight"
    key = next(k for k in first if k.endswith(trained))
    assert not torch.equal(first[key], last[key])  # the third step changed the weights


@pytest.mark.slow
def test_run_index_increments_and_never_overwrites(tiny_sdxl, image_dir, tmp_path):
    out = tmp_path / "out"
    (out / "00007-abcd-old_run").mkdir(parents=True)
    (out / "00007-abcd-old_run" / "keep.txt").write_text("earlier work")
    (out / "notes").mkdir()
    from tlora.train.trainer import train

    run = train(parse_args(train_args(tiny_sdxl, image_dir, out, "--num_train_epochs", "1")))
    assert run.name.startswith("00008-") and (out / "00007-abcd-old_run" / "keep.txt").read_text() == "earlier work"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1", "logs"]


@pytest.mark.slow
def test_prior_preservation_and_one_image(tiny_sdxl, image_dir, class_dir, tmp_path):
    from tlora.train.trainer import Trainer

    args = parse_args(train_args(tiny_sdxl, image_dir, tmp_path / "out", "--with_prior_preservation",
                                 "--class_data_dir", str(class_dir), "--one_image", "01.jpg",
                                 "--train_batch_size", "2", "--num_train_epochs", "2"))
    trainer = Trainer(args)
    trainer.setup()
    assert len(trainer.conditioning.images["instance"]) == 1 and len(trainer.conditioning.images["class"]) == 3
    batch = trainer.conditioning.batch(next(trainer.batches()))
    assert batch["mean"].shape[0] == 4  # 2 instance + 2 class
    assert not torch.equal(batch["prompt_embeds"][0], batch["prompt_embeds"][2])  # class prompt differs
    run = trainer.train()
    assert all(torch.isfinite(torch.tensor(trainer.losses)))
    assert (run / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_wandb_offline_run_logs_loss_and_no_secret(tiny_sdxl, image_dir, tmp_path):
    secret = "SECRETwandbKEY0123456789abcdef"
    argv = train_args(tiny_sdxl, image_dir, tmp_path / "out", "--wandb_api_key", secret, "--num_train_epochs", "4",
                      "--checkpointing_steps", "4")
    done = launch(argv, env={"WANDB_MODE": "offline"}, accelerate=False)
    run = only_run(tmp_path / "out")
    logs = list((run / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    losses = [h["loss"] for h in history(logs[0]) if "loss" in h]
    assert len(losses) == 4 and all(0 < v < 10 for v in losses)
    assert secret not in done.stdout + done.stderr
    for path in run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert yaml.safe_load((run / "logs" / "hparams.yml").read_text())["wandb_api_key"] is None


@pytest.mark.slow
def test_cached_and_uncached_training_agree(tiny_sdxl, image_dir, tmp_path):
    from tlora.train.trainer import Trainer

    losses = {}
    for cache in (True, False):
        args = parse_args(train_args(tiny_sdxl, image_dir, tmp_path / f"out{cache}", "--one_image", "00.png",
                                     "--num_train_epochs", "20", "--checkpointing_steps", "20"))
        trainer = Trainer(args, cache=cache)
        trainer.setup()
        trainer.train()
        losses[cache] = trainer.losses
    assert len(losses[True]) == 20
    assert torch.allclose(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_losses(tiny_sdxl, image_dir, tmp_path):
    from tlora.train.trainer import Trainer

    losses = {}
    for flag in ((), ("--gradient_checkpointing",)):
        args = parse_args(train_args(tiny_sdxl, image_dir, tmp_path / f"out{len(flag)}", "--num_train_epochs", "5",
                                     "--checkpointing_steps", "5", *flag))
        trainer = Trainer(args)
        trainer.setup()
        assert trainer.pipe.unet.is_gradient_checkpointing == bool(flag)
        trainer.train()
        losses[flag] = trainer.losses
    assert torch.allclose(torch.tensor(losses[()]), torch.tensor(losses[("--gradient_checkpointing",)]), atol=1e-6)
    assert losses[()][0] != losses[()][-1]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "dog_example").is_dir(), reason="../shared/dog_example not present")
def test_trains_on_the_authors_dog_photos(tiny_sdxl, tmp_path):
    from tlora.train.trainer import train

    run = train(parse_args(train_args(tiny_sdxl, SHARED / "dog_example", tmp_path, "--one_image", "02.jpg",
                                      "--num_train_epochs", "2")))
    assert run.name.endswith("-dog_example_tortho_lora4")
    assert (run / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_cpu_demo_then_inference_and_analyze(tmp_path, capsys):
    """The newcomer's chain from README: demo, then inference.py and analyze on its run."""
    from tlora import demo
    from tlora.evaluation import analysis

    import inference

    assert demo.main(["--output_dir", str(tmp_path), "--steps", "2"]) == 0
    run = Path(capsys.readouterr().out.split("demo run folder: ")[1].strip())
    assert run.parent == tmp_path and (tmp_path / "tiny-sdxl" / "model_index.json").is_file()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1", "checkpoint-2", "logs"]
    assert len(list((run / "checkpoint-2" / "samples" / "ns25_gs5.0" / "version_0").glob("*/[0-9].png"))) == 2
    assert inference.main(["--config_path", str(run / "logs" / "hparams.yml"), "--checkpoint_idx", "2",
                           "--prompts", "a {0} riding a bike", "--num_images_per_prompt", "1",
                           "--num_inference_steps", "2"]) == 0
    assert (run / "checkpoint-2" / "samples" / "ns2_gs5.0" / "version_0" / "a sks riding a bike" / "0.png").is_file()
    assert analysis.main([str(run)]) == 0
    assert (run / "analysis" / "rank_schedule.png").is_file()
    assert demo.main(["--steps", "0"]) == 2 and "--steps must be a whole number of at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_progress_bar_moves_every_step(tiny_sdxl, image_dir, tmp_path, monkeypatch):
    from tlora.train import trainer as training

    updates = []

    class Bar:
        def __init__(self, *args, **kwargs):
            self.n = kwargs.get("initial", 0)

        def update(self, n):
            self.n += n
            updates.append(self.n)

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr(training, "tqdm", Bar)
    training.train(parse_args(train_args(tiny_sdxl, image_dir, tmp_path, "--num_train_epochs", "8",
                                         "--checkpointing_steps", "8")))
    assert updates == list(range(1, 9))
