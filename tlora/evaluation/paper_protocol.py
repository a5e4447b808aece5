"""`python -m tlora.protocol MANIFEST.yaml`: the paper's evaluation protocol as one command.

For every concept x method of the manifest: train (train.py in a subprocess), generate the protocol's
prompts (25 contextual x 5, 6 complex x 5, the base prompt x 15), evaluate IS, DINO-IS and TS, and record
the row. Work already done is skipped, so an interrupted protocol run resumes. At the end: `results.csv`,
`results.md` (mean and std per method) and `is_vs_ts.png`. With `accelerate launch --num_processes N`, the
jobs are spread over the processes (one GPU each).

Manifest (YAML):

    output_dir: protocol_runs              # required
    pretrained_model_name_or_path: stabilityai/stable-diffusion-xl-base-1.0
    placeholder_token: sks
    images: {contextual: 5, complex: 5, base: 15}   # images per prompt; keys left out keep these defaults
    num_prompts: {contextual: 25, complex: 6}       # fewer for a quick look
    num_inference_steps: 25               # default: the model family's (inference.py's)
    guidance_scale: 5.0                   # default: the model family's (inference.py's)
    height: 1024                          # and width: default the pipeline's own (inference.py's)
    evaluation: {clip_model: openai/clip-vit-base-patch32, dino_model: facebook/dino-vits16}  # mask_dir: too
    report_to: none                        # or wandb
    concepts:
      - {name: dog, image: dog_example/02.jpg, class_name: dog, kind: live}
    methods:
      - {name: T-LoRA, config: configs/tlora.yaml}
      - {name: LoRA, config: configs/lora.yaml, overrides: {num_train_epochs: 500}}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tlora.common.commands import run_command
from tlora.common.errors import UsageError
from tlora.common.files import atomic_write
from tlora.common.flags import Parser
from tlora.common.prompts import BASE_PROMPT
from tlora.evaluation.manifest import Concept, Manifest, Method, prompt_set
from tlora.evaluation.report import METRICS, collect, log_report, result_path, write_report

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def _flag_list(values: dict) -> list[str]:
    argv = []
    for key, value in values.items():
        if isinstance(value, bool):
            argv += [f"--{key}"] if value else []
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def job_env() -> dict[str, str]:
    """A single-process environment for a training subprocess, on this process's GPU only."""
    from accelerate import PartialState

    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    state = PartialState()
    if state.num_processes > 1 and state.device.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = ids[state.local_process_index]
    return env


def final_checkpoint(job_dir: Path, steps: int) -> Path | None:
    """checkpoint-<steps> of a finished run in job_dir, if any."""
    from tlora.runs.run_folder import RunFolder, weights_file

    runs = job_dir.iterdir() if job_dir.is_dir() else []
    done = sorted(c for run in runs if weights_file(c := RunFolder(run).checkpoint(steps)))
    return done[-1] if done else None


def job_dir(m: Manifest, concept: Concept, method: Method) -> Path:
    """runs/<concept>/<method>, with both names made single safe folder names (never outside output_dir)."""
    return m.output_dir / "runs" / concept.folder_name / method.folder_name


def train_flags(m: Manifest, concept: Concept, method: Method) -> list[str]:
    image = Path(concept.image)
    flags = {"config": method.config, "train_data_dir": str(image.parent), "one_image": image.name,
             "output_dir": str(job_dir(m, concept, method)), "class_name": concept.class_name,
             "placeholder_token": m.placeholder_token,
             "pretrained_model_name_or_path": m.pretrained_model_name_or_path,
             "pretrained_vae_model_name_or_path": m.pretrained_vae_model_name_or_path, "report_to": m.report_to,
             "resume_from_checkpoint": "latest",  # a job killed half-way goes on where it stopped
             **method.overrides}
    return _flag_list(flags)


def train_job(m: Manifest, concept: Concept, method: Method) -> Path:
    """Train one concept with one method (skipped when its final checkpoint exists)."""
    from tlora.train.options import parse_args

    argv, folder = train_flags(m, concept, method), job_dir(m, concept, method)
    steps = parse_args(argv).num_train_epochs
    if (done := final_checkpoint(folder, steps)) is not None:
        return done
    subprocess.run([sys.executable, "-m", "tlora.cli", "train", *argv], check=True, env=job_env())
    return final_checkpoint(folder, steps)


def _pipeline(pipes: dict, hp: dict, family, device: str):
    """One pipeline per base model for the whole protocol run (kept on the CPU between jobs)."""
    from tlora.families.pipelines import DTYPES, load_pipeline

    key = (hp["pretrained_model_name_or_path"], hp.get("pretrained_vae_model_name_or_path"), hp.get("revision"))
    if key not in pipes:
        dtype = DTYPES[family.gpu_dtype if device.startswith("cuda") else "fp32"]
        pipes[key] = load_pipeline(*key, dtype, family)
    return pipes[key]


def generate_job(
    m: Manifest, concept: Concept, checkpoint: Path, device: str, pipes: dict
) -> tuple[Path, dict[str, list[str]]]:
    """The protocol's images for one checkpoint (prompt folders already complete are skipped)."""
    from tlora.generate import api, generation
    from tlora.runs.reading import read

    ckpt = read(checkpoint)
    hp, family = ckpt.hparams, ckpt.family
    steps = m.num_inference_steps or family.inference_steps
    guidance = family.inference_guidance if m.guidance_scale is None else m.guidance_scale
    contextual, complex_ = prompt_set(concept.kind)
    groups = {"contextual": contextual[: m.num_prompts["contextual"]], "complex": complex_[: m.num_prompts["complex"]]}
    folder = family.samples_folder(checkpoint, steps, guidance, 0)
    pipe = _pipeline(pipes, hp, family, device).to(device)
    api.load(pipe, ckpt)
    try:
        for name, templates in {"base": [BASE_PROMPT], **groups}.items():
            size = generation.image_size(("height", "width"), m.height, m.width, family.resolution_multiple)
            cfg = generation.Sampling(m.placeholder_token, concept.class_name, folder, m.images[name], 1, steps,
                                      guidance, m.seed, call_kwargs=family.call_kwargs(hp) | size,
                                      guidance_arg=family.guidance_arg)
            generation.run(pipe, templates, cfg, str(checkpoint))
    finally:
        api.unload(pipe)
        pipe.to("cpu")  # the next job's training subprocess gets the GPU's memory
    return folder, groups


def run_job(m: Manifest, concept: Concept, method: Method, embedders, device: str, pipes: dict) -> dict:
    from tlora.evaluation.metrics import reference_images
    from tlora.evaluation.scoring import evaluate_samples

    checkpoint = train_job(m, concept, method)
    samples, groups = generate_job(m, concept, checkpoint, device, pipes)
    refs = reference_images(concept.image, m.evaluation.get("mask_dir"))
    metrics = evaluate_samples(embedders, refs, samples, concept.class_name, m.placeholder_token, groups)
    return {"concept": concept.name, "method": method.name, "kind": concept.kind,
            **{k: metrics.get(k) for k in METRICS}, "checkpoint": str(checkpoint)}


def parse_args(argv: list[str] | None = None) -> Manifest:
    """The manifest, with every job's train.py flags checked before anything is trained or loaded."""
    from tlora.generate.generation import image_size
    from tlora.train.options import parse_args as train_args

    p = Parser(description=__doc__.splitlines()[0], epilog="Manifest format: see the module docstring "
               "(python -c 'import tlora.evaluation.paper_protocol as p; print(p.__doc__)') or docs/evaluate.md.")
    p.add_argument("manifest", help="YAML file: output_dir, concepts, methods, and generation settings.")
    path = p.parse_args(argv).manifest
    m = Manifest.read(path)
    from tlora.evaluation.metrics import DEFAULT_CLIP, DEFAULT_DINO
    from tlora.evaluation.scoring import check_embedders

    check_embedders(f"manifest {path}: evaluation.clip_model", m.evaluation.get("clip_model", DEFAULT_CLIP),
                    f"manifest {path}: evaluation.dino_model", m.evaluation.get("dino_model", DEFAULT_DINO))
    for concept, method in m.jobs():
        try:
            opts = train_args(train_flags(m, concept, method))
            image_size(("height", "width"), m.height, m.width, opts.recipe.resolution_multiple)
        except UsageError as err:
            raise UsageError(f"manifest: {concept.name} x {method.name}: {err}") from None
    return m


def run(m: Manifest) -> list[dict]:
    """Every job not done yet (this process's share), then the report; returns every finished row."""
    from accelerate import PartialState

    from tlora.evaluation.metrics import DEFAULT_CLIP, DEFAULT_DINO, Embedders

    state = PartialState()
    device = str(state.device)
    embedders, pipes = None, {}
    for i, (concept, method) in enumerate(m.jobs()):
        if i % state.num_processes != state.process_index or result_path(m, concept, method).is_file():
            continue
        if embedders is None:
            embedders = Embedders.load(m.evaluation.get("clip_model", DEFAULT_CLIP),
                                       m.evaluation.get("dino_model", DEFAULT_DINO), device)
        row = run_job(m, concept, method, embedders, device, pipes)
        atomic_write(result_path(m, concept, method), json.dumps(row, indent=2).encode())
        print(f"{concept.name} x {method.name}: " + ", ".join(f"{k} {row[k]:.4f}" for k in METRICS
                                                                     if row[k] is not None))
    state.wait_for_everyone()
    rows = collect(m, write=state.is_main_process)
    if state.is_main_process:
        md, png = write_report(m, rows)
        log_report(m, png, rows)
        print(md.read_text())
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_command(parse_args, run, None, argv)


if __name__ == "__main__":
    sys.exit(main())
