"""tlora.read: weights found in any layout, settings from each source in order, what was assumed said, and
export refusing to build a timestep mask on a guess."""

import shutil
import warnings

import pytest
import torch
import yaml
from safetensors.torch import save_file

import tlora
from tlora.common.errors import CheckpointError
from tlora.interop import exporting
from tlora.runs.hparams import to_hparams
from tlora.runs.run_folder import find_weights
from tlora.runs.weights import WEIGHTS_NAME, save_weights

from helpers import perturb, read_weights

SETTINGS = tlora.TLoRASettings("lora", 8, 4, 1.0, True, "sdxl", rank_rule="divide_first")


@pytest.fixture(scope="module")
def our_run(tiny_sdxl, tmp_path_factory):
    """A run folder as train.py leaves it: logs/hparams.yml, checkpoint-5 and checkpoint-10 (with metadata)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    torch.manual_seed(0)
    adapters = tlora.attach(unet, SETTINGS)
    run = tmp_path_factory.mktemp("runs") / "00001-abcd-dog_tlora8"
    for step in (5, 10):
        perturb(adapters, seed=step)
        save_weights(adapters.state_dict(), run / f"checkpoint-{step}", SETTINGS.to_metadata() | {"global_step": step})
    (run / "logs").mkdir()
    (run / "logs" / "hparams.yml").write_text(yaml.safe_dump(to_hparams(SETTINGS) | {"output_dir": str(run)}))
    return run


def authors_file(our_run, folder):
    """Our checkpoint-10 as the authors' SDXL tool writes it: the same tensors, `format: pt` as the only metadata."""
    folder.mkdir(parents=True)
    save_file(read_weights(our_run / "checkpoint-10")[0], str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder


def test_weights_are_found_in_every_layout(our_run, tmp_path):
    newest = our_run / "checkpoint-10" / WEIGHTS_NAME
    assert find_weights(our_run) == newest == find_weights(our_run / "checkpoint-10") == find_weights(newest)
    assert tlora.read(our_run).settings == tlora.read(newest).settings
    with pytest.raises(CheckpointError, match="no T-LoRA weights in"):
        find_weights(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        find_weights(tmp_path / "nothing")


def test_our_files_need_nothing_beside_them(our_run, tmp_path):
    inside = tlora.read(our_run / "checkpoint-10")
    assert inside.hparams_path == our_run / "logs" / "hparams.yml"
    alone = shutil.copytree(our_run / "checkpoint-10", tmp_path / "empty" / "checkpoint-10")
    copied = tlora.read(alone)
    assert copied.hparams_path is None and copied.assumed == {}
    assert copied.settings == inside.settings == SETTINGS
    assert {copied.sources[k] for k in ("timestep_dependent", "min_rank", "alpha_rank_scale")} == {"the file's metadata"}


def test_the_authors_sdxl_run_reads_its_hparams(our_run, tmp_path):
    run = tmp_path / "00001-d034-dog_tlora8"
    authors_file(our_run, run / "checkpoint-10")
    (run / "logs").mkdir()
    theirs = {"trainer_type": "lora", "trainer_class": "sdxl_tlora", "lora_rank": 8, "min_rank": 4,
              "alpha_rank_scale": 1.0, "sig_type": "last", "output_dir": "PATH", "wandb_api_key": None}
    (run / "logs" / "hparams.yml").write_text(yaml.dump(theirs))
    ckpt = tlora.read(run)
    assert ckpt.settings == SETTINGS and ckpt.assumed == {}
    assert ckpt.sources["min_rank"] == str(run / "logs" / "hparams.yml") and ckpt.sources["trainer_type"] == \
        str(run / "logs" / "hparams.yml")


def test_a_bare_file_says_what_it_assumes(our_run, tmp_path, sdxl_pipe):
    folder = authors_file(our_run, tmp_path / "alone")
    with pytest.warns(tlora.AssumedSetting) as said:
        ckpt = tlora.read(folder)
    lines = [str(w.message) for w in said]
    # rank and type from the tensors
    assert ckpt.settings == tlora.TLoRASettings("lora", 8, 1, 1.0, True, "sdxl", rank_rule="divide_first")
    assert {k: ckpt.sources[k] for k in ("timestep_dependent", "min_rank", "alpha_rank_scale")} == dict.fromkeys(
        ("timestep_dependent", "min_rank", "alpha_rank_scale"), "default")
    assert {ckpt.sources[k] for k in ("family", "trainer_type", "lora_rank")} == {"the tensors"}
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    assert any("assuming trainer_class sdxl_tlora" in line for line in lines)
    assert any("nothing records min_rank; assuming 1" in line and "pass min_rank=... to tlora.load" in line
               for line in lines)
    with pytest.warns(tlora.AssumedSetting) as said:
        tlora.load(sdxl_pipe, folder)
    tlora.unload(sdxl_pipe)
    assert [str(w.message) for w in said] == lines  # tlora.load says the same
    with warnings.catch_warnings():
        warnings.simplefilter("error", tlora.AssumedSetting)
        ckpt = tlora.read(folder, trainer_class="sdxl_tlora", min_rank=4, alpha_rank_scale=1.0)  # nothing assumed
    assert ckpt.settings == SETTINGS and ckpt.sources["min_rank"] == "given"


def test_records_that_disagree_are_an_error(our_run, tmp_path):
    run = shutil.copytree(our_run, tmp_path / "run")
    hparams = yaml.safe_load((run / "logs" / "hparams.yml").read_text()) | {"min_rank": 2}
    (run / "logs" / "hparams.yml").write_text(yaml.safe_dump(hparams))
    with pytest.raises(CheckpointError, match="min_rank: the file's metadata says 4 but .*hparams.yml says 2"):
        tlora.read(run)
    assert tlora.read(run, min_rank=2).settings.min_rank == 2  # a setting given by the caller decides


def test_files_of_another_family_or_settings_are_refused(our_run, flux_pipe):
    with pytest.raises(CheckpointError, match="was trained on sdxl; this is a flux model"):
        tlora.load(flux_pipe, our_run)
    with pytest.raises(CheckpointError, match="this is a lora checkpoint, rank 8, but the settings say"):
        tlora.read(our_run, trainer_type="ortho_lora")
    with pytest.raises(ValueError, match="unknown setting 'minrank'"):
        tlora.load(flux_pipe, our_run, minrank=2)


def test_export_never_builds_a_timestep_mask_on_a_guess(our_run, tmp_path, capsys):
    folder = authors_file(our_run, tmp_path / "alone")
    out = tmp_path / "lora.safetensors"
    assert exporting.main([str(folder), "--format", "kohya", "--out", str(out), "--mask", "timestep:700"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--mask timestep:700 is built on min_rank, which" in err
    assert "pass --min_rank or --config_path RUN/logs/hparams.yml" in err and not out.exists()
    assert exporting.main([str(folder), "--format", "diffusers-scheduled", "--out", str(tmp_path / "s")]) == 2
    assert "--format diffusers-scheduled is built on min_rank" in capsys.readouterr().err
    assert exporting.main([str(folder), "--format", "kohya", "--out", str(out)]) == 0  # --mask full: no setting used
    assert "note: " not in capsys.readouterr().err
    fixed = tmp_path / "fixed.safetensors"
    assert exporting.main([str(folder), "--format", "kohya", "--out", str(fixed), "--mask", "timestep:700",
                        "--min_rank", "4"]) == 0
    notes = capsys.readouterr().err.splitlines()  # the other assumptions are said
    assert len(notes) == 2 and all(line.startswith("note: ") for line in notes)
    assert "assuming trainer_class sdxl_tlora" in notes[0] and "pass --trainer_class or --config_path" in notes[0]
    ours = tmp_path / "ours.safetensors"
    assert exporting.main([str(our_run), "--format", "kohya", "--out", str(ours), "--mask", "timestep:700"]) == 0
    a, b = read_weights(fixed)[0], read_weights(ours)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    downs = {v.shape[0] for k, v in a.items() if k.endswith(".lora_down.weight")}
    assert downs == {5}  # r(700) = int(0.3 * (8 - 4)) + 4 = 5 components per path (3 with a guessed min_rank 1)


def test_a_checkpoint_copied_alone_exports_as_inside_its_run(our_run, tmp_path):
    alone = shutil.copytree(our_run / "checkpoint-10", tmp_path / "empty" / "checkpoint-10")
    for source, name in ((our_run / "checkpoint-10", "inside"), (alone, "alone")):
        assert exporting.main([str(source), "--format", "diffusers", "--out", str(tmp_path / f"{name}.safetensors"),
                            "--mask", "timestep:300"]) == 0
    (a, meta_a), (b, meta_b) = read_weights(tmp_path / "inside.safetensors"), read_weights(tmp_path / "alone.safetensors")
    assert meta_a == meta_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
