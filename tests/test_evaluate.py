"""Metrics, the protocol runner and the analysis pictures, with tiny random CLIP, DINO and SDXL."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from tlora.evaluation import paper_protocol as protocol
from tlora.evaluation.analysis import analyse_updates, analyze, effective_rank
from tlora.evaluation.manifest import Concept, Manifest
from tlora.evaluation.metrics import mask_background, reference_images
from tlora.evaluation.report import collect
from tlora.evaluation.scoring import evaluate_samples
from tlora.families import FAMILIES
from tlora.method.settings import TLoRASettings

from helpers import make_image


def write_samples(folder, prompts, images):
    for name, imgs in zip(prompts, images):
        (folder / name).mkdir(parents=True)
        for k, img in enumerate(imgs):
            img.save(folder / name / f"{k}.png")


def random_image(seed, size=48):
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def test_identical_images_give_similarity_one(tiny_embedders, tmp_path):
    ref = random_image(0)
    write_samples(tmp_path, ["a photo of sks", "a sks on the beach"], [[ref, ref, ref], [random_image(1)]])
    result = evaluate_samples(tiny_embedders, [ref], tmp_path, "dog", "sks")
    assert result["IS"] == pytest.approx(1.0, abs=1e-5) and result["DINO_IS"] == pytest.approx(1.0, abs=1e-5)
    assert result["num_base_images"] == 3
    other = evaluate_samples(tiny_embedders, [random_image(5)], tmp_path, "dog", "sks")
    assert other["IS"] < 0.9999 and other["DINO_IS"] < 0.9999


def test_text_similarity_equals_a_hand_computed_cosine(tiny_embedders, tmp_path):
    images = [random_image(2), random_image(3)]
    write_samples(tmp_path, ["a sks riding a bike"], [images])
    (tmp_path / "prompts.yaml").write_text(yaml.safe_dump({"a sks riding a bike": {"prompt": "a {0} riding a bike"}}))
    result = evaluate_samples(tiny_embedders, [random_image(0)], tmp_path, "dog", "sks",
                              groups={"contextual": ["a {0} riding a bike"]})
    clip, proc = tiny_embedders.clip, tiny_embedders.clip_processor
    with torch.no_grad():
        tokens = proc(text=["a dog riding a bike"], return_tensors="pt", padding=True)
        text = clip.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        pixels = proc(images=images, return_tensors="pt")["pixel_values"]
        image = clip.get_image_features(pixel_values=pixels)
    text, image = [x if isinstance(x, torch.Tensor) else x.pooler_output for x in (text, image)]
    by_hand = float((F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).T).mean())
    assert result["TS_per_prompt"]["a {0} riding a bike"] == pytest.approx(by_hand, abs=1e-6)
    assert result["TS"] == result["TS_contextual"] == result["TS_per_prompt"]["a {0} riding a bike"]
    assert "IS" not in result  # no base-prompt images
    assert "class name" in result["ts_text"]


def test_evaluate_command(tiny_embedder_dir, tmp_path, capsys):
    from tlora.evaluation.scoring import main

    ref = random_image(0)
    ref.save(tmp_path / "ref.png")
    write_samples(tmp_path / "samples", ["a photo of sks", "a sks swimming"], [[ref], [random_image(1)]])
    assert main(["--reference", str(tmp_path / "ref.png"), "--samples", str(tmp_path / "samples"),
                 "--class_name", "dog", "--placeholder_token", "sks", "--device", "cpu",
                 "--clip_model", str(tiny_embedder_dir / "clip"), "--dino_model", str(tiny_embedder_dir / "dino")]) == 0
    saved = json.loads((tmp_path / "samples" / "metrics.json").read_text())
    assert saved["IS"] == pytest.approx(1.0, abs=1e-5) and "a {0} swimming" in saved["TS_per_prompt"]
    out = capsys.readouterr().out
    assert "| IS | DINO_IS | TS |" in out and f"{saved['TS']:.4f}" in out


def test_masks_flatten_the_background(tmp_path):
    image = random_image(0, 8)
    mask = np.zeros((8, 8), dtype="uint8")
    mask[2:6, 2:6] = 255
    out = np.asarray(mask_background(image, Image.fromarray(mask)))
    assert (out[0, 0] == 127).all() and np.array_equal(out[3, 3], np.asarray(image)[3, 3])
    (tmp_path / "refs").mkdir()
    (tmp_path / "masks").mkdir()
    image.save(tmp_path / "refs" / "00.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "00.png")
    [masked] = reference_images(tmp_path / "refs", tmp_path / "masks")
    assert np.array_equal(np.asarray(masked), out)


def test_effective_rank_by_hand():
    assert effective_rank(torch.tensor([10.0, 5.0, 3.0, 1.0, 1.0])) == 4  # 18/20 = 0.90 < 0.95 <= 19/20
    assert effective_rank(torch.tensor([1.0, 0.0, 0.0])) == 1
    assert effective_rank(torch.ones(8)) == 8
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 4, generator=g))
    v, _ = torch.linalg.qr(torch.randn(10, 4, generator=g))
    s = torch.tensor([8.0, 4.0, 2.0, 1.0])  # 12/15 = 0.8, 14/15 = 0.933, 15/15: effective rank 4
    weights = {"a.attn1.processor.to_q_lora.up.weight": u * s, "a.attn1.processor.to_q_lora.down.weight": v.T}
    settings = TLoRASettings("lora", 4, family="sdxl", rank_rule="divide_first")
    layer = analyse_updates(FAMILIES["sdxl"], weights, settings)["a.attn1.processor.to_q_lora"]
    assert layer["effective_rank"] == 4 and layer["kind"] == "self"
    assert torch.allclose(torch.tensor(layer["singular_values"][:4], dtype=torch.float64), s.double(), atol=1e-5)


@pytest.mark.slow
def test_analyze_writes_its_pictures(tiny_sdxl, image_dir, tmp_path):
    from tlora.train.options import parse_args
    from tlora.train.trainer import train

    from helpers import train_args

    run = train(parse_args(train_args(tiny_sdxl, image_dir, tmp_path, "--num_train_epochs", "12",
                                      "--checkpointing_steps", "12", "--validation_prompts", "a {0}#a red {0}",
                                      "--num_val_imgs_per_prompt", "2")))
    out = analyze(run)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["effective_rank.json", "effective_rank.png", "loss.png", "rank_schedule.png", "samples_grid.png"]
    assert Image.open(out / "samples_grid.png").size == (2 * 64, 2 * (64 + 24))
    layers = json.loads((out / "effective_rank.json").read_text())
    assert {v["kind"] for v in layers.values()} == {"self", "cross"}
    assert all(1 <= v["effective_rank"] <= 8 for v in layers.values())  # P L Q - P0 L0 Q0: rank <= 2r
    assert (run / "logs" / "loss.csv").read_text().count("\n") == 13  # header + 12 steps


@pytest.mark.slow
def test_protocol_runner_end_to_end_and_resume(tiny_sdxl, tiny_embedders, tiny_embedder_dir, tmp_path,
                                                monkeypatch):
    for i in range(2):
        make_image(tmp_path / f"concept{i}.png", seed=i)
    for name, ttype in (("tl", "ortho_lora"), ("vl", "lora")):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({
            "trainer_type": ttype, "trainer_class": "sdxl_tlora", "lora_rank": 4, "min_rank": 2,
            "num_train_epochs": 2, "checkpointing_steps": 2, "resolution": 64, "dataloader_num_workers": 0}))
    manifest = {
        "output_dir": "bench", "pretrained_model_name_or_path": str(tiny_sdxl),
        "pretrained_vae_model_name_or_path": "none", "images": {"contextual": 1, "complex": 1, "base": 2},
        "num_prompts": {"contextual": 2, "complex": 1}, "num_inference_steps": 2,
        "evaluation": {"clip_model": str(tiny_embedder_dir / "clip"), "dino_model": str(tiny_embedder_dir / "dino")},
        "concepts": [{"name": "pet", "image": "concept0.png", "class_name": "dog", "kind": "live"},
                     {"name": "thing", "image": "concept1.png", "class_name": "cup", "kind": "object"}],
        "methods": [{"name": "T-LoRA", "config": "tl.yaml"}, {"name": "Vanilla", "config": "vl.yaml"}],
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    monkeypatch.setattr("tlora.evaluation.metrics.Embedders.load", classmethod(lambda cls, *a, **k: tiny_embedders))
    rows = protocol.run(protocol.parse_args([str(tmp_path / "m.yaml")]))
    out = tmp_path / "bench"
    assert [(r["concept"], r["method"]) for r in rows] == [("pet", "T-LoRA"), ("pet", "Vanilla"),
                                                          ("thing", "T-LoRA"), ("thing", "Vanilla")]
    assert all(0 < r[k] <= 1.0 + 1e-6 for r in rows for k in ("IS", "DINO_IS")) and all(r["TS_complex"] for r in rows)
    assert (out / "results.csv").read_text().count("\n") == 5
    md = (out / "results.md").read_text()
    assert "| T-LoRA | 2 |" in md and "±" in md and (out / "is_vs_ts.png").stat().st_size > 0
    version = next(out.glob("runs/pet/T-LoRA/*/checkpoint-2/samples/ns2_gs5.0/version_0"))
    assert sorted(p.name for p in version.iterdir()) == sorted(
        ["a photo of sks", "a chocolate-colored sks", "a red sks", "a sks in a chief outfit in a nostalgic kitchen "
         "filled with vintage furniture and scattered biscuit", "prompts.yaml"])
    assert len(list((version / "a photo of sks").glob("[0-9].png"))) == 2

    work = lambda: {p: p.stat().st_mtime_ns for d in ("runs", "results") for p in (out / d).rglob("*") if p.is_file()}  # noqa: E731
    before = work()

    def no_training(*a, **k):
        raise AssertionError("a finished job was run again")

    monkeypatch.setattr(protocol, "run_job", no_training)
    assert protocol.main([str(tmp_path / "m.yaml")]) == 0
    again = collect(protocol.parse_args([str(tmp_path / "m.yaml")]))
    assert again == rows
    assert work() == before  # nothing trained, generated or evaluated again


@pytest.mark.slow
def test_protocol_runner_on_flux(tiny_flux, tiny_embedders, tiny_embedder_dir, tmp_path, monkeypatch):
    make_image(tmp_path / "concept.png", seed=3)
    (tmp_path / "flux.yaml").write_text(yaml.safe_dump({  # the authors' FLUX flag names
        "tlora": True, "rank": 4, "min_rank": 1, "max_train_steps": 1, "checkpointing_steps": 1, "resolution": 64,
        "max_sequence_length": 16, "dataloader_num_workers": 0}))
    manifest = {
        "output_dir": "bench", "pretrained_model_name_or_path": str(tiny_flux),
        "images": {"contextual": 1, "complex": 1, "base": 1}, "num_prompts": {"contextual": 1, "complex": 1},
        "num_inference_steps": 2, "concepts": [{"name": "pet", "image": "concept.png", "class_name": "dog"}],
        "evaluation": {"clip_model": str(tiny_embedder_dir / "clip"), "dino_model": str(tiny_embedder_dir / "dino")},
        "methods": [{"name": "Vanilla T-LoRA", "config": "flux.yaml"}], "height": 64, "width": 48,
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    monkeypatch.setattr("tlora.evaluation.metrics.Embedders.load", classmethod(lambda cls, *a, **k: tiny_embedders))
    (row,) = protocol.run(protocol.parse_args([str(tmp_path / "m.yaml")]))
    assert row["method"] == "Vanilla T-LoRA" and 0 < row["IS"] <= 1.0 + 1e-6
    version = next((tmp_path / "bench").glob("runs/pet/Vanilla T-LoRA/*/checkpoint-1/samples/ns2gs3.5/version_0"))
    (image,) = (version / "a photo of sks").glob("[0-9].png")
    assert Image.open(image).size == (48, 64)  # the manifest's size (else FluxPipeline's own, 1024 px)


def test_manifest_counts_merge_with_their_defaults_and_paths_are_the_manifests(tmp_path):
    make_image(tmp_path / "concept.png")
    (tmp_path / "masks").mkdir()
    make_image(tmp_path / "masks" / "concept.png")  # a mask for each concept: checked when the manifest is read
    manifest = {"output_dir": "bench", "images": {"base": 3}, "num_prompts": {"complex": 2},
                "evaluation": {"mask_dir": "masks"}, "methods": [{"name": "T-LoRA", "config": "tl.yaml"}],
                "concepts": [{"name": "pet", "image": "concept.png", "class_name": "dog"}]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    m = Manifest.read(tmp_path / "m.yaml")
    assert m.concepts == [Concept("pet", str(tmp_path / "concept.png"), "dog", "live")]  # typed, kind defaulted
    assert m.images == {"contextual": 5, "complex": 5, "base": 3} and m.num_prompts == {"contextual": 25, "complex": 2}
    assert m.evaluation["mask_dir"] == str(tmp_path / "masks")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest | {"images": {"bsae": 3}}))
    with pytest.raises(ValueError, match="images must be a mapping with keys among contextual, complex, base"):
        Manifest.read(tmp_path / "m.yaml")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest | {"concepts": [{"name": "pet", "imgae": "concept.png"}]}))
    with pytest.raises(ValueError, match="every entry of concepts needs name, image, class_name"):
        Manifest.read(tmp_path / "m.yaml")
    collect(m, write=False)  # the processes other than the main one
    assert not (tmp_path / "bench" / "results.csv").exists()


def test_an_empty_prompts_yaml_is_no_record(tmp_path):
    from tlora.evaluation.scoring import prompt_folders
    from tlora.generate.generation import read_record

    folder = tmp_path / "version_0"
    make_image((folder / "a photo of sks").mkdir(parents=True) or folder / "a photo of sks" / "0.png")
    (folder / "prompts.yaml").write_text("")
    assert read_record(folder) == {}
    assert prompt_folders(folder, "sks") == {"a photo of {0}": folder / "a photo of sks"}
    (folder / "prompts.yaml").write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not a mapping of prompt folders"):
        read_record(folder)


@pytest.mark.parametrize("rank, min_rank", [(4, 2), (8, 1), (64, 32)])
def test_rank_schedule_ticks_are_whole_ranks(tmp_path, rank, min_rank):
    from tlora.evaluation.analysis import plot_rank_schedule

    settings = TLoRASettings("lora", rank, min_rank, family="sdxl", rank_rule="divide_first")
    ticks = plot_rank_schedule(settings, tmp_path / "r.png")
    assert ticks and all(t == int(t) for t in ticks) and (tmp_path / "r.png").is_file()
