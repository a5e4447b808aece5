"""Everything a user names (prompts, token, concept and data names) stays inside the folder it belongs to."""

from pathlib import Path

import pytest

from tlora.common.safe_names import safe_component

import inference
from helpers import train_args


@pytest.mark.parametrize("text", ["../../x", "/abs/x", "..", ".", "", " ", "a\nb", "a\\b", ".hidden", "x" * 300,
                                  "é" * 200])
def test_unsafe_text_becomes_one_safe_component(text):
    name = safe_component(text)
    assert name and "/" not in name and "\\" not in name and name not in (".", "..") and not name.startswith(".")
    assert len(name.encode()) <= 120 and name.isprintable()


def test_safe_names_keep_plain_prompts_and_never_collide():
    assert safe_component("a sks riding a bike") == "a sks riding a bike"
    long_a, long_b = "a" * 200 + " one", "a" * 200 + " two"
    assert safe_component(long_a) != safe_component(long_b)
    assert safe_component("a/b") != safe_component("a\\b") != safe_component("a_b")
    assert safe_component("prompts.yaml", reserved=frozenset({"prompts.yaml"})).startswith("prompts.yaml-")


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_prompts_and_token_never_write_outside_the_run(tiny_sdxl, image_dir, tmp_path):
    from tlora.train.options import parse_args
    from tlora.train.trainer import train

    escape = tmp_path / "escape"
    climb = "../" * 8 + "y {0}"  # from the version folder up past tmp_path
    prompts = [f"{escape}_{{0}}", climb, "x" * 300 + " {0}", "a {0} on the beach"]
    before = files_under(tmp_path)
    outside = lambda: {p for d in (tmp_path.parent, tmp_path.parent.parent) for p in d.glob("y *")}  # noqa: E731
    outside_before = outside()
    run = train(parse_args(train_args(tiny_sdxl, image_dir, tmp_path / "out", "--num_train_epochs", "1",
                                      "--placeholder_token", "../../z", "--validation_prompts", "#".join(prompts),
                                      "--num_val_imgs_per_prompt", "1")))
    assert inference.main(["--config_path", str(run / "logs" / "hparams.yml"), "--checkpoint_idx", "1",
                           "--prompts", "#".join(prompts), "--num_images_per_prompt", "1",
                           "--num_inference_steps", "2"]) == 0
    new = files_under(tmp_path) - before
    assert new and all(p.is_relative_to(run) for p in new), sorted(p for p in new if not p.is_relative_to(run))
    assert outside() == outside_before
    for version in run.glob("checkpoint-1/samples/*/version_0"):
        folders = sorted(p for p in version.iterdir() if p.is_dir())
        assert len(folders) == 4 and all(len(list(f.glob("[0-9].png"))) == 1 for f in folders)
        assert (version / "a ../../z on the beach").exists() is False  # the token made safe too


def test_benchmark_job_folders_stay_in_output_dir(tmp_path):
    from tlora.evaluation.manifest import Concept, Manifest, Method
    from tlora.evaluation.paper_protocol import job_dir
    from tlora.evaluation.report import result_path

    m = Manifest(output_dir=tmp_path / "bench", concepts=[], methods=[])
    for a, b in (("../../../z", "/abs"), ("..", "x" * 300)):
        concept, method = Concept(a, "dog.png", "dog"), Method(b, "c.yaml")
        for path in (job_dir(m, concept, method), result_path(m, concept, method)):
            assert path.resolve().is_relative_to((tmp_path / "bench").resolve())
            assert len(path.relative_to(tmp_path / "bench").parts) in (2, 3)
