"""Every bad value is refused up front: the estimator's numbers and model folders, the protocol's
manifest, the evaluate command's inputs, and the checks train.py and inference.py run before any model loads
(a VAE of another family, prompts a text encoder cuts). Each error is one helpful line (conftest.one_line_error)."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import yaml

from tlora.common.commands import run_command
from tlora.common.messages import Note, note
from tlora.common.values import shown
from tlora.evaluation import paper_protocol as protocol
from tlora.evaluation import scoring
from tlora.families import FAMILIES
from tlora.families.model_checks import check_vae, long_prompts
from tlora.train import estimator

from conftest import one_line_error
from helpers import make_image

VAE_FLAG = "--pretrained_vae_model_name_or_path"


def configs_of(model, folder):
    """A model folder's configs only (no weights): enough for the estimator, which builds the model empty."""
    shutil.copytree(model, folder, ignore=lambda d, names: [n for n in names
                                                            if (Path(d) / n).is_file() and not n.endswith(".json")])
    return folder


def edit_json(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


# -- python -m tlora.estimate ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--fit", "nan"], "--fit must be a finite number in (0, inf), got nan"),
    (["--fit", "inf"], "--fit must be a finite number in (0, inf), got inf"),
    (["--fit", "0"], "--fit must be a finite number in (0, inf), got 0.0"),
    (["--fit", "-4"], "--fit must be a finite number in (0, inf), got -4.0"),
    (["--utilization", "nan"], "--utilization must be a finite number in (0, 1], got nan"),
    (["--utilization", "inf"], "--utilization must be a finite number in (0, 1], got inf"),
    (["--utilization", "0"], "--utilization must be a finite number in (0, 1], got 0.0"),
    (["--utilization", "-0.5"], "--utilization must be a finite number in (0, 1], got -0.5"),
    (["--utilization", "1.5"], "--utilization must be a finite number in (0, 1], got 1.5"),
    (["--utilization", "5e-324"], "--utilization 5e-324 is too small a share to give a step time"),
    (["--seed", "-1"], "--seed must be a whole number from 0 to 4294967295, got -1"),
    (["--seed", str(2**32)], "--seed must be a whole number from 0 to 4294967295"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_estimate_numbers(capsys, flags, message):
    one_line_error(capsys, estimator.main(["--pretrained_model_name_or_path", "sdxl", *flags]), message)


def _no_unet_config(folder):
    (folder / "unet" / "config.json").unlink()


def _no_unet_entry(folder):
    edit_json(folder / "model_index.json", lambda index: {k: v for k, v in index.items() if k != "unet"})


def _no_vae(folder):
    shutil.rmtree(folder / "vae")


def _bytes(name):
    return lambda folder: (folder / name).write_bytes(bytes(range(128, 256)) * 2)


def _text(name, text):
    return lambda folder: (folder / name).write_text(text)


def _unet_class(name):
    return lambda folder: edit_json(folder / "model_index.json", lambda index: index | {"unet": name})


@pytest.mark.parametrize("damage, message", [
    (_no_unet_config, "has no unet/config.json (or model_index.json does not name unet), which its sdxl pipeline"),
    (_no_unet_entry, "has no unet/config.json (or model_index.json does not name unet)"),
    (_no_vae, "has no vae/config.json"),
    (_bytes("model_index.json"), "model_index.json is not UTF-8 text; pass a model folder in diffusers layout"),
    (_text("model_index.json", "{'unet': 1"), "model_index.json is not valid JSON at line 1; pass a model folder"),
    (_text("model_index.json", "[1, 2]"), "model_index.json does not hold a JSON object of settings"),
    (_bytes("unet/config.json"), "unet/config.json is not UTF-8 text"),
    (_text("unet/config.json", "[]"), "unet/config.json does not hold a JSON object of settings"),
    (_text("scheduler/scheduler_config.json", "{\n"), "scheduler/scheduler_config.json is not valid JSON at line 2"),
    (_unet_class(["diffusers"]), "gives unet as ['diffusers'], not [library, class]"),
    (_unet_class(["os", "system"]), "gives unet as ['os', 'system'], a class of neither diffusers nor transformers"),
    (_unet_class(["diffusers", "NoSuchModel"]), "do not build its sdxl pipeline (module diffusers has no attribute"),
    (_text("unet/config.json", "{}"), "do not build its sdxl pipeline"),
], ids=["no unet config", "no unet entry", "no vae", "index not utf-8", "index not json", "index a list",
        "unet config not utf-8", "unet config a list", "scheduler config not json", "unet spec short",
        "unet of another library", "unet class unknown", "unet config empty"])
def test_estimate_model_folders(tiny_sdxl, tmp_path, capsys, damage, message):
    """A local folder whose configs the estimator cannot build from is one line naming it, never a traceback."""
    folder = configs_of(tiny_sdxl, tmp_path / "model")
    damage(folder)
    err = one_line_error(capsys, estimator.main(["--pretrained_model_name_or_path", str(folder), "--resolution", "64"]),
                         message)
    assert "--pretrained_model_name_or_path" in err and str(folder) in err


def test_estimate_flux_folder_without_transformer(tiny_flux, tmp_path, capsys):
    folder = configs_of(tiny_flux, tmp_path / "flux")
    shutil.rmtree(folder / "transformer")
    one_line_error(capsys, estimator.main(["--pretrained_model_name_or_path", str(folder), "--resolution", "64"]),
                   "has no transformer/config.json (or model_index.json does not name transformer), which its flux")


@pytest.mark.slow
def test_estimate_reads_a_folder_of_configs_only(tiny_sdxl, tmp_path, capsys):
    """The estimator needs configs only: the same folder without weights answers (the checks refuse nothing
    that is whole)."""
    folder = configs_of(tiny_sdxl, tmp_path / "model")
    assert estimator.main(["--pretrained_model_name_or_path", str(folder), "--resolution", "64", "--lora_rank", "4",
                          "--min_rank", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_gb"] > 0


def test_estimate_reads_a_cached_hub_models_configs(tiny_sdxl, fake_cache, capsys):
    """A hub id (offline, in the cache): its model_index.json and configs are checked as a folder's are."""
    files = {str(p.relative_to(tiny_sdxl)): p.read_text() for p in tiny_sdxl.glob("*/*.json")}
    fake_cache("someone/sdxl", files | {"model_index.json": b"\xff\xfe"})
    one_line_error(capsys, estimator.main(["--pretrained_model_name_or_path", "someone/sdxl"]),
                   "/model_index.json is not UTF-8 text; pass a model folder in diffusers layout")
    fake_cache("someone/sdxl", {"model_index.json": (tiny_sdxl / "model_index.json").read_text(),
                                "unet/config.json": "{"})
    one_line_error(capsys, estimator.main(["--pretrained_model_name_or_path", "someone/sdxl"]),
                   "unet/config.json is not valid JSON at line 1; pass a model folder in diffusers layout")


# -- python -m tlora.protocol: the manifest -------------------------------------------------------------------
@pytest.fixture
def manifest(tmp_path, tiny_sdxl):
    """A whole manifest (dict), with its concept image, method config and evaluation models (folders with a
    config.json: all the checks read) beside it."""
    make_image(tmp_path / "concept.png")
    (tmp_path / "tl.yaml").write_text(yaml.safe_dump({
        "trainer_type": "ortho_lora", "trainer_class": "sdxl_tlora", "lora_rank": 4, "min_rank": 2,
        "num_train_epochs": 2, "checkpointing_steps": 2, "resolution": 64, "dataloader_num_workers": 0}))
    for name in ("clip", "dino"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": name.replace("dino", "vit")}))
    return {"output_dir": "bench", "pretrained_model_name_or_path": str(tiny_sdxl),
            "pretrained_vae_model_name_or_path": "none",
            "evaluation": {"clip_model": str(tmp_path / "clip"), "dino_model": str(tmp_path / "dino")},
            "concepts": [{"name": "pet", "image": "concept.png", "class_name": "dog"}],
            "methods": [{"name": "T-LoRA", "config": "tl.yaml"}]}


def run_manifest(tmp_path, content) -> int:
    path = tmp_path / "m.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return protocol.main([str(path)])


@pytest.mark.parametrize("content, message", [
    (bytes(range(256)), "manifest: {m} is not UTF-8 text; pass a YAML manifest"),
    ("- output_dir: bench\n",
     "manifest {m} must hold a mapping of settings (output_dir, concepts, methods, ...), not a list; fix the manifest"),
    ("just words\n", "must hold a mapping of settings (output_dir, concepts, methods, ...), not text"),
    ("output_dir: b\n? [a, b]\n: 1\n", "manifest {m} is not valid YAML at line 2 (a list cannot be a key); fix the "
                                       "manifest"),
    ("output_dir: b\nconcepts: {[1]: 2}\n", "(a list cannot be a key)"),
    ("output_dir: b\noutput_dir: c\n", "(the key 'output_dir' is given twice)"),
    ("1: 2\n", "manifest {m}: unknown key 1; fix the manifest"),
    ("output_dir: b\nconcepts: [1: 2\n", "is not valid YAML at line"),
], ids=["random bytes", "a list", "text", "list key", "list key inside", "key twice", "number key", "broken yaml"])
def test_manifest_files(tmp_path, capsys, content, message):
    one_line_error(capsys, run_manifest(tmp_path, content), message.format(m=tmp_path / "m.yaml"))


@pytest.mark.parametrize("change, message", [
    ({"output_dir": ["b"]}, "output_dir must be text, got ['b']; fix the manifest"),
    ({"images": [1, 2]}, "images must be a mapping with keys among contextual, complex, base, got [1, 2]"),
    ({"images": {"base": 0}}, "images.base must be a whole number of at least 1, got 0"),
    ({"images": {"base": 2.5}}, "images.base must be a whole number of at least 1, got 2.5"),
    ({"num_prompts": {"contextual": 26}}, "num_prompts.contextual is 26, but the protocol has 25 contextual prompts"),
    ({"num_prompts": {"complex": 7}}, "num_prompts.complex is 7, but the protocol has 6 complex prompts"),
    ({"evaluation": ["clip"]}, "evaluation must be a mapping with keys among clip_model, dino_model, mask_dir"),
    ({"evaluation": {"clip_model": 3}}, "evaluation.clip_model must be text, got 3"),
    ({"evaluation": {"mask_dir": "nowhere"}}, "evaluation.mask_dir {t}/nowhere is not a folder"),
    ({"evaluation": {"clip_model": "{t}/dino"}},
     "evaluation.clip_model: {t}/dino is not a CLIP model (its config.json says model_type 'vit'); pass a CLIP model"),
    ({"evaluation": {"clip_model": "{t}/nothing"}}, "evaluation.clip_model: {t}/nothing does not exist; pass"),
    ({"seed": -1}, "seed must be a whole number from 0 to 4294967295, got -1; pass one in that range"),
    ({"seed": 2**32}, "seed must be a whole number from 0 to 4294967295, got 4294967296"),
    ({"seed": 1.5}, "seed must be a whole number from 0 to 4294967295, got 1.5"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number in [0, 100.0], got nan"),
    ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number in [0, 100.0], got inf"),
    ({"guidance_scale": -1}, "guidance_scale must be a finite number in [0, 100.0], got -1"),
    ({"guidance_scale": "5"}, "guidance_scale must be a finite number in [0, 100.0], got '5'"),
    ({"num_inference_steps": 0}, "num_inference_steps must be a whole number of at least 1, got 0"),
    ({"num_inference_steps": "25"}, "num_inference_steps must be a whole number of at least 1, got '25'"),
    ({"report_to": "slack"}, "report_to must be one of none, wandb, tensorboard, got 'slack'"),
    ({"placeholder_token": None}, "placeholder_token must be text, got None"),
    ({"concepts": [{"name": "pet", "image": "concept.png", "class_name": ["dog"]}]},
     "concepts entry 'pet': class_name must be text, got ['dog']"),
    ({"concepts": [{"name": 7, "image": "concept.png", "class_name": "dog"}]}, "name must be text, got 7"),
    ({"concepts": [{"name": "pet", "image": "concept.png", "class_name": "dog", "kind": "plant"}]},
     "concept kind must be live or object, got 'plant'"),
    ({"concepts": ["pet"]}, "every entry of concepts needs name, image, class_name"),
    ({"methods": [{"name": "T-LoRA", "config": "tl.yaml", "overrides": ["--lora_rank", 4]}]},
     "method 'T-LoRA': overrides must be a mapping of train.py flag names to values, not a list"),
    ({"methods": [{"name": "T-LoRA", "config": "tl.yaml", "overrides": {"output_dir": "x"}}]},
     "overrides cannot set output_dir, which the protocol sets for every job"),
    ({"methods": [{"name": "T-LoRA", "config": "tl.yaml", "overrides": {"lora_rank": [4]}}]},
     "overrides lora_rank must be a single value, got [4]"),
    ({"methods": [{"name": "T-LoRA", "config": "tl.yaml", "overrides": {"learning_rate": float("nan")}}]},
     "--learning_rate must be a finite number in (0, inf), got nan"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_manifest_values(tmp_path, capsys, manifest, change, message):
    """Each wrong value, type or shape of the manifest is one line naming the manifest (checked before the
    evaluation models and every job's train.py flags)."""
    change = json.loads(json.dumps(change).replace("{t}", str(tmp_path)))  # NaN and inf go through as they are
    one_line_error(capsys, run_manifest(tmp_path, manifest | change), message.format(t=tmp_path))


def test_manifest_masks_are_checked_before_training(tmp_path, capsys, manifest):
    (tmp_path / "masks").mkdir()
    evaluation = manifest["evaluation"] | {"mask_dir": "masks"}
    one_line_error(capsys, run_manifest(tmp_path, manifest | {"evaluation": evaluation}),
                   f"evaluation.mask_dir {tmp_path / 'masks'} has no mask named concept.* for concept 'pet'; add one")


def test_a_damaged_result_row_is_one_line(tmp_path, capsys, manifest):
    from tlora.evaluation.manifest import Manifest
    from tlora.evaluation.report import collect, result_path

    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    m = Manifest.read(tmp_path / "m.yaml")
    row = result_path(m, *m.jobs()[0])
    row.parent.mkdir(parents=True)
    for text in ("{not json", '{"concept": "pet"}', "[1]", '{"concept": "pet", "method": "T-LoRA", "kind": "live", '
                 '"IS": "high", "DINO_IS": null, "TS_contextual": null, "TS_complex": null, "checkpoint": "x"}'):
        row.write_text(text)
        code = run_command(lambda argv: collect(m, write=False), lambda rows: None, None, [])
        one_line_error(capsys, code, f"protocol result {row} is not a row the protocol writes")
    row.write_bytes(b"\xff\xfe")
    one_line_error(capsys, run_command(lambda argv: collect(m, write=False), lambda rows: None, None, []),
                   "is not UTF-8 text; delete it to run that job again")


# -- python -m tlora.evaluate --------------------------------------------------------------------------------
@pytest.fixture
def samples(tmp_path):
    make_image(tmp_path / "ref.png")
    for name in ("a photo of sks", "a sks swimming"):
        (tmp_path / "samples" / name).mkdir(parents=True)
        make_image(tmp_path / "samples" / name / "0.png")
    return ["--reference", str(tmp_path / "ref.png"), "--samples", str(tmp_path / "samples"), "--class_name", "dog",
            "--placeholder_token", "sks", "--clip_model", "/no/clip", "--dino_model", "/no/dino"]


def _flag(args, flag, value):
    return [value if i and args[i - 1] == flag else a for i, a in enumerate(args)]


def test_evaluate_inputs(tmp_path, capsys, samples):
    """The models named do not exist: each refusal below comes before the model check, so before any load."""
    main = scoring.main
    one_line_error(capsys, main([*samples, "--batch_size", "0"]), "--batch_size must be a whole number of at least 1, got 0; pass")
    one_line_error(capsys, main([*samples, "--device", "gpu!"]), "--device: 'gpu!' is not a device; pass cpu")
    one_line_error(capsys, main([*samples, "--device", "meta"]),
                   "--device 'meta': tlora runs on cpu, cuda, mps; pass one of them")
    (tmp_path / "out").mkdir()
    one_line_error(capsys, main([*samples, "--output", str(tmp_path / "out"), "--overwrite"]),
                   f"--output: {tmp_path / 'out'} is a folder; pass a file path")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    one_line_error(capsys, main(_flag(samples, "--reference", str(tmp_path / "bad.png"))),
                   "--reference: bad.png is not a readable image")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, main(_flag(samples, "--reference", str(tmp_path / "empty"))),
                   f"--reference: no images (.jpg, .jpeg, .png, .webp, .bmp) in {tmp_path / 'empty'}; pass an image")
    (tmp_path / "masks").mkdir()
    one_line_error(capsys, main([*samples, "--mask_dir", str(tmp_path / "masks")]),
                   f"--mask_dir: no mask named ref.* in {tmp_path / 'masks'}; add one")
    (tmp_path / "masks" / "ref.png").write_text("not an image")
    one_line_error(capsys, main([*samples, "--mask_dir", str(tmp_path / "masks")]),
                   "--mask_dir: ref.png is not a readable image")
    one_line_error(capsys, main(_flag(samples, "--class_name", "")), "--class_name must not be empty")
    one_line_error(capsys, main(_flag(samples, "--placeholder_token", "s\nks")),
                   "--placeholder_token: 's\\nks' holds a control character")
    one_line_error(capsys, main(samples), "--clip_model: /no/clip does not exist")  # every input above was fine
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_bytes(b"\xff")
    one_line_error(capsys, main(_flag(samples, "--clip_model", str(tmp_path / "clip"))),
                   f"--clip_model: {tmp_path / 'clip' / 'config.json'} is not UTF-8 text; pass a CLIP or DINO model")


def test_evaluate_samples_that_cannot_be_read(tmp_path, capsys, samples):
    broken = tmp_path / "samples" / "a sks swimming" / "1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    one_line_error(capsys, scoring.main(samples), f"--samples: {broken} is not a readable image")
    broken.unlink()
    record = tmp_path / "samples" / "prompts.yaml"
    record.write_text(yaml.safe_dump({"a sks swimming": {"prompt": ["a {0} swimming"]}}))
    one_line_error(capsys, scoring.main(samples), "gives the prompt of a sks swimming as ['a {0} swimming'], not text;"
                                                   " delete or fix it")
    record.write_text(yaml.safe_dump({"a sks swimming": {"prompt": "a {1} swimming"}}))
    one_line_error(capsys, scoring.main(samples), "'a {1} swimming' has the field {1}; only {0}")


# -- check_vae ----------------------------------------------------------------------------------------------------
def vae_check(*args) -> int:
    """check_vae as a command runs it: its refusal is the command's one line."""
    return run_command(lambda argv: check_vae(*args), lambda _: None, None, [])


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """A Hugging Face cache in tmp_path: `put(repo, files)` stores {path in repo: text} as the cached snapshot."""
    from huggingface_hub import constants

    root = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))

    def put(repo: str, files: dict) -> None:
        folder = root / f"models--{repo.replace('/', '--')}"
        commit = "0" * 40
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
        for name, content in files.items():
            path = folder / "snapshots" / commit / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)

    return put


def test_check_vae_refuses_another_familys_vae(tiny_sdxl, tiny_flux, tiny_klein, capsys):
    """SDXL's VAE (4 latent channels) on FLUX.1 (16), FLUX.1's on SDXL, and SDXL's on klein (its own class,
    AutoencoderKLFlux2, though the tiny one has 4 channels too): one line naming the flag, both VAEs and the fix."""
    err = one_line_error(capsys, vae_check(VAE_FLAG, str(tiny_sdxl / "vae"), str(tiny_flux), None),
                         f"{VAE_FLAG}: {tiny_sdxl / 'vae'} is AutoencoderKL with 4 latent channels (as SD / SDXL "
                         f"models use), but {tiny_flux} is made for AutoencoderKL with 16 latent channels (as FLUX.1 "
                         "models use); pass a VAE of the model's family, or none for the model's own")
    assert err.count("\n") == 1
    one_line_error(capsys, vae_check(VAE_FLAG, str(tiny_flux / "vae"), str(tiny_sdxl), None),
                   "is AutoencoderKL with 16 latent channels (as FLUX.1 models use), but")
    one_line_error(capsys, vae_check(VAE_FLAG, str(tiny_sdxl / "vae"), str(tiny_klein), None),
                   "is made for AutoencoderKLFlux2 with 4 latent channels; pass a VAE of the model's family")


def test_check_vae_passes_the_models_own_kind(tiny_sdxl, tiny_flux, tiny_klein):
    for model in (tiny_sdxl, tiny_flux, tiny_klein):
        check_vae(VAE_FLAG, str(model / "vae"), str(model), None)
        for own in (None, "", "none", "None"):
            check_vae(VAE_FLAG, own, str(model), None)


def test_check_vae_unreadable_configs(tiny_sdxl, tmp_path, capsys):
    vae = tmp_path / "vae"
    vae.mkdir()
    one_line_error(capsys, vae_check(VAE_FLAG, str(vae), str(tiny_sdxl), None),
                   f"{VAE_FLAG}: {vae} has no config.json; pass a VAE folder in diffusers layout")
    for content, message in ((bytes(range(128, 256)), "is not UTF-8 text"), (b"{oops", "is not valid JSON at line 1"),
                             (b"[4]", "does not hold a JSON object of settings")):
        (vae / "config.json").write_bytes(content)
        one_line_error(capsys, vae_check(VAE_FLAG, str(vae), str(tiny_sdxl), None),
                       f"{VAE_FLAG}: {vae / 'config.json'} {message}; pass a VAE folder")
    one_line_error(capsys, vae_check(VAE_FLAG, str(vae / "config.json"), str(tiny_sdxl), None),
                   "config.json is a file, not a folder; pass a VAE folder")
    one_line_error(capsys, vae_check(VAE_FLAG, str(tmp_path / "nothing"), str(tiny_sdxl), None),
                   f"{VAE_FLAG}: {tmp_path / 'nothing'} does not exist; pass a VAE folder")


def test_check_vae_reads_the_hub_cache_and_skips_what_only_the_network_has(tiny_sdxl, tiny_flux, fake_cache, capsys):
    flux_vae = (tiny_flux / "vae" / "config.json").read_text()
    fake_cache("someone/flux-vae", {"config.json": flux_vae})
    fake_cache("someone/sdxl", {"vae/config.json": (tiny_sdxl / "vae" / "config.json").read_text()})
    one_line_error(capsys, vae_check(VAE_FLAG, "someone/flux-vae", "someone/sdxl", None),
                   "someone/flux-vae is AutoencoderKL with 16 latent channels (as FLUX.1 models use), but someone/sdxl"
                   " is made for AutoencoderKL with 4 latent channels")
    one_line_error(capsys, vae_check(VAE_FLAG, "someone/flux-vae", str(tiny_sdxl), None), "someone/flux-vae is")
    check_vae(VAE_FLAG, "someone/not-cached", str(tiny_sdxl), None)  # only the network could tell: no refusal
    check_vae(VAE_FLAG, "someone/flux-vae", "someone/not-cached", None)
    check_vae(VAE_FLAG, "someone/flux-vae", str(tiny_flux), None)
    fake_cache("someone/broken-vae", {"config.json": b"\xff\xfe"})
    one_line_error(capsys, vae_check(VAE_FLAG, "someone/broken-vae", str(tiny_sdxl), None), "is not UTF-8 text")


# -- long_prompts ---------------------------------------------------------------------------------------------------
def words(n: int) -> str:
    return " ".join(["a"] * n)  # one token each in every tiny tokenizer ("a", "▁a", "Ġa")


def test_long_prompts_sdxl_both_clips_read_77_with_start_and_end(tiny_sdxl):
    assert long_prompts(str(tiny_sdxl), None, FAMILIES["sdxl"], [words(75), "a photo of sks dog"], None) == []
    assert long_prompts(str(tiny_sdxl), None, FAMILIES["sdxl"], [words(76)], None) == [
        f"the prompt {shown(words(76))} is 78 tokens; CLIP text encoder 1 and CLIP text encoder 2 read 77, the rest "
        "is cut; shorten it"]


def test_long_prompts_flux_clip_and_t5(tiny_flux):
    from tlora import families

    flux = families.get("flux")
    assert long_prompts(str(tiny_flux), None, flux, [words(75)], 76) == []  # CLIP: 75 + 2; T5: 75 + its end
    [line] = long_prompts(str(tiny_flux), None, flux, [words(75)], 75)
    assert line.endswith("is 76 tokens; T5 reads 75, the rest is cut; shorten it")
    [line] = long_prompts(str(tiny_flux), None, flux, [words(80), words(80)], 100)  # said once
    assert line.endswith("is 82 tokens; CLIP (the pooled prompt embedding) reads 77, the rest is cut; shorten it")
    [line] = long_prompts(str(tiny_flux), None, flux, [words(80)], 16)
    assert line.endswith("is 82 tokens for CLIP (the pooled prompt embedding), which reads 77, and 81 tokens for T5, "
                         "which reads 16; the rest is cut; shorten it")
    assert len(long_prompts(str(tiny_flux), None, flux, [words(400)], None)) == 1  # None: the pipelines' 512
    assert long_prompts(str(tiny_flux), None, flux, [words(70)], None) == []


def test_long_prompts_klein_counts_the_chat_template(tiny_klein):
    """klein's Qwen3 reads the prompt inside its chat template, as Flux2KleinPipeline tokenizes it: the line counts
    the template's tokens, and a max_sequence_length of exactly that many cuts nothing."""
    from transformers import AutoTokenizer

    [line] = long_prompts(str(tiny_klein), None, FAMILIES["klein"], ["a photo of sks dog"], 8)
    n = int(line.split(" is ")[1].split(" tokens")[0])
    assert line == (f"the prompt 'a photo of sks dog' is {n} tokens; Qwen3 (the prompt in klein's chat template) "
                    "reads 8, the rest is cut; shorten it")
    assert long_prompts(str(tiny_klein), None, FAMILIES["klein"], ["a photo of sks dog"], n) == []
    assert len(long_prompts(str(tiny_klein), None, FAMILIES["klein"], ["a photo of sks dog"], n - 1)) == 1
    tokenizer = AutoTokenizer.from_pretrained(tiny_klein, subfolder="tokenizer")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a photo of sks dog"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert "a photo of sks dog" in text and len(text) > len("a photo of sks dog")
    kept = tokenizer(text, padding="max_length", truncation=True, max_length=n)  # as the pipeline calls it
    assert sum(kept["attention_mask"]) == n == len(tokenizer(text)["input_ids"])


def test_long_prompts_match_the_pipelines_own_truncation(sdxl_pipe, tiny_sdxl, monkeypatch):
    """diffusers' SDXL pipeline warns that it cut a prompt exactly when long_prompts says so."""
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl as module

    from tlora.families import sdxl

    said = []
    monkeypatch.setattr(module.logger, "warning", lambda message, *a, **k: said.append(message))
    for n in (75, 76, 120):
        said.clear()
        sdxl.SDXL.encode_prompt(sdxl_pipe, words(n), sdxl_pipe.device, 77)
        cut_by_pipeline = any("truncated" in message for message in said)
        noted = long_prompts(str(tiny_sdxl), None, FAMILIES["sdxl"], [words(n)], None)
        assert cut_by_pipeline == bool(noted) == (n > 75)


def test_long_prompts_reads_cached_tokenizers_and_skips_missing_ones(tiny_sdxl, fake_cache, tmp_path):
    files = {str(p.relative_to(tiny_sdxl)): p.read_bytes() for sub in ("tokenizer", "tokenizer_2")
             for p in (tiny_sdxl / sub).iterdir()}
    fake_cache("someone/sdxl", files | {"model_index.json": (tiny_sdxl / "model_index.json").read_text()})
    assert len(long_prompts("someone/sdxl", None, FAMILIES["sdxl"], [words(76)], None)) == 1
    # the network only: no note
    assert long_prompts("someone/not-cached", None, FAMILIES["sdxl"], [words(76)], None) == []
    half = configs_of(tiny_sdxl, tmp_path / "half")
    shutil.rmtree(half / "tokenizer_2")
    assert long_prompts(str(half), None, FAMILIES["sdxl"], [words(76)], None) == [
        long_prompts(str(tiny_sdxl), None, FAMILIES["sdxl"], [words(76)], None)[0].replace(
            "CLIP text encoder 1 and CLIP text encoder 2 read", "CLIP text encoder 1 reads")]


def test_long_prompts_lines_are_notes(tiny_sdxl, capsys):
    """A caller says each line as a note: one `note:` line under a command."""
    def run(_):
        for line in long_prompts(str(tiny_sdxl), None, FAMILIES["sdxl"], [words(90)], None):
            note(line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", Note)
        assert run_command(lambda argv: None, run, None, []) == 0
    err = capsys.readouterr().err
    assert err.startswith("note: the prompt 'a a a") and err.count("\n") == 1 and "shorten it" in err
