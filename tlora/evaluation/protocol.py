"""`python -m tlora.benchmark MANIFEST.yaml`: the paper's protocol as one command.

For every concept x method of the manifest: train (train.py in a subprocess), generate the protocol's
prompts (25 contextual x 5, 6 complex x 5, the base prompt x 15), evaluate IS, DINO-IS and TS, and record
the row. Work already done is skipped, so an interrupted benchmark resumes. At the end: `results.csv`,
`results.md` (mean and std per method) and `is_vs_ts.png`. With `accelerate launch --num_processes N`, the
jobs are spread over the processes (one GPU each).

Manifest (YAML):

    output_dir: bench                      # required
    pretrained_model_name_or_path: stabilityai/stable-diffusion-xl-base-1.0
    placeholder_token: sks
    images: {contextual: 5, complex: 5, base: 15}   # images per prompt; keys left out keep these defaults
    num_prompts: {contextual: 25, complex: 6}       # fewer for a quick look
    num_inference_steps: 25               # default: the model family's (SDXL 25, FLUX 28)
    guidance_scale: 5.0                   # default: the model family's (SDXL 5.0, FLUX 3.5)
    evaluation: {clip_model: openai/clip-vit-base-patch32, dino_model: facebook/dino-vits16}  # mask_dir: too
    report_to: none                        # or wandb
    concepts:
      - {name: dog, image: dog_example/02.jpg, class_name: dog, kind: live}
    methods:
      - {name: T-LoRA, config: configs/tlora.yaml}
      - {name: LoRA, config: configs/lora.yaml, overrides: {num_train_epochs: 500}}
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from tlora.common.commands import run_command
from tlora.common.errors import UsageError
from tlora.common.files import atomic_write
from tlora.common.prompts import BASE_PROMPT
from tlora.common.safe_names import safe_component
from tlora.common.usage import Parser, load_yaml

COLUMNS = ("concept", "method", "kind", "IS", "DINO_IS", "TS_contextual", "TS_complex", "checkpoint")
IMAGES = {"contextual": 5, "complex": 5, "base": 15}  # images per prompt of each group (the paper's)
NUM_PROMPTS = {"contextual": 25, "complex": 6}
METRICS = ("IS", "DINO_IS", "TS_contextual", "TS_complex")
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def prompt_set(kind: str) -> tuple[list[str], list[str]]:
    """(contextual, complex) prompt templates of the paper for a `live` or `object` concept."""
    if kind not in ("live", "object"):
        raise UsageError(f"manifest: concept kind must be live or object, got {kind!r}")
    lines = resources.files("tlora").joinpath(f"prompts/prompts_{kind}.txt").read_text().splitlines()
    lines = [line.strip() for line in lines if line.strip()]
    return lines[:25], lines[25:]


@dataclass
class Manifest:
    output_dir: Path
    concepts: list[dict]
    methods: list[dict]
    placeholder_token: str = "sks"
    pretrained_model_name_or_path: str | None = None
    pretrained_vae_model_name_or_path: str | None = None
    images: dict = field(default_factory=lambda: dict(IMAGES))
    num_prompts: dict = field(default_factory=lambda: dict(NUM_PROMPTS))
    num_inference_steps: int | None = None  # None: the model family's default
    guidance_scale: float | None = None
    seed: int = 0
    evaluation: dict = field(default_factory=dict)
    report_to: str = "none"
    project_name: str = "tlora"

    @classmethod
    def read(cls, path: str | Path) -> "Manifest":
        """Read and check a manifest: paths relative to it, names made safe folder names, one-line errors."""
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise UsageError(f"manifest {path}: cannot read it ({err.strerror}); pass a YAML manifest") from None
        values = load_yaml(text, f"manifest {path}") or {}
        if not isinstance(values, dict):
            raise UsageError(f"manifest {path}: must be a mapping (see python -m tlora.benchmark --help)")
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise UsageError(f"manifest {path}: unknown key {sorted(unknown)[0]!r}")
        for key in ("output_dir", "concepts", "methods"):
            if not values.get(key):
                raise UsageError(f"manifest {path}: {key} is required; add it")
        base = Path(path).resolve().parent
        values["output_dir"] = base / values["output_dir"]
        for kind, keys in (("concepts", ("name", "image", "class_name")), ("methods", ("name", "config"))):
            names = []
            for item in values[kind]:
                missing = [k for k in keys if not isinstance(item, dict) or k not in item]
                if missing:
                    raise UsageError(f"manifest {path}: every entry of {kind} needs {', '.join(keys)} ({item!r})")
                names.append(safe_component(str(item["name"])))
            if len(set(names)) != len(names):
                raise UsageError(f"manifest {path}: two {kind} share a name; give each its own")
        for item in values["concepts"]:
            item["image"] = str(base / item["image"])
            prompt_set(item.get("kind", "live"))
        for item in values["methods"]:
            item["config"] = str(base / item["config"])
        for key, defaults in (("images", IMAGES), ("num_prompts", NUM_PROMPTS)):
            values[key] = _counts(path, key, values.get(key) or {}, defaults)
        evaluation = values.get("evaluation") or {}
        if not isinstance(evaluation, dict):
            raise UsageError(f"manifest {path}: evaluation must be a mapping (clip_model, dino_model, mask_dir)")
        if evaluation.get("mask_dir"):
            evaluation["mask_dir"] = str(base / evaluation["mask_dir"])
        values["evaluation"] = evaluation
        return cls(**values)

    def jobs(self) -> list[tuple[dict, dict]]:
        return [(c, m) for c in self.concepts for m in self.methods]


def _counts(path, key: str, given, defaults: dict[str, int]) -> dict[str, int]:
    """A partial mapping of counts over its defaults (images: {base: 3} keeps contextual and complex)."""
    if not isinstance(given, dict) or set(given) - set(defaults):
        raise UsageError(f"manifest {path}: {key} must be a mapping with keys among {', '.join(defaults)}")
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"manifest {path}: {key}.{name} must be a whole number of at least 1, got {value!r}")
    return {**defaults, **given}


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
    from tlora.runs.reading import weights_file

    done = sorted(folder for folder in job_dir.glob(f"*/checkpoint-{steps}") if weights_file(folder))
    return done[-1] if done else None


def job_dir(m: Manifest, concept: dict, method: dict) -> Path:
    """runs/<concept>/<method>, with both names made single safe folder names (never outside output_dir)."""
    return m.output_dir / "runs" / safe_component(str(concept["name"])) / safe_component(str(method["name"]))


def train_flags(m: Manifest, concept: dict, method: dict) -> list[str]:
    image = Path(concept["image"])
    flags = {"config": method["config"], "train_data_dir": str(image.parent), "one_image": image.name,
             "output_dir": str(job_dir(m, concept, method)), "class_name": concept["class_name"], "placeholder_token": m.placeholder_token,
             "pretrained_model_name_or_path": m.pretrained_model_name_or_path,
             "pretrained_vae_model_name_or_path": m.pretrained_vae_model_name_or_path, "report_to": m.report_to,
             "resume_from_checkpoint": "latest",  # a job killed half-way goes on where it stopped
             **method.get("overrides", {})}
    return _flag_list(flags)


def train_job(m: Manifest, concept: dict, method: dict) -> Path:
    """Train one concept with one method (skipped when its final checkpoint exists)."""
    from tlora.train.options import parse_args

    argv, folder = train_flags(m, concept, method), job_dir(m, concept, method)
    steps = parse_args(argv).num_train_epochs
    if (done := final_checkpoint(folder, steps)) is not None:
        return done
    subprocess.run([sys.executable, "-m", "tlora.cli", "train", *argv], check=True, env=job_env())
    return final_checkpoint(folder, steps)


def _pipeline(pipes: dict, hp: dict, family, device: str):
    """One pipeline per base model for the whole benchmark (kept on the CPU between jobs)."""
    from tlora.families.pipelines import DTYPES, load_pipeline

    key = (hp["pretrained_model_name_or_path"], hp.get("pretrained_vae_model_name_or_path"), hp.get("revision"))
    if key not in pipes:
        dtype = DTYPES[family.gpu_dtype if device.startswith("cuda") else "fp32"]
        pipes[key] = load_pipeline(*key, dtype, family.name)
    return pipes[key]


def generate_job(
    m: Manifest, concept: dict, checkpoint: Path, device: str, pipes: dict
) -> tuple[Path, dict[str, list[str]]]:
    """The protocol's images for one checkpoint (prompt folders already complete are skipped)."""
    from tlora import families
    from tlora.generate import api, generation
    from tlora.runs.reading import read

    ckpt = read(checkpoint)
    hp, family = ckpt.hparams, families.get(ckpt.settings.family)
    steps = m.num_inference_steps or family.inference_steps
    guidance = family.inference_guidance if m.guidance_scale is None else m.guidance_scale
    contextual, complex_ = prompt_set(concept.get("kind", "live"))
    groups = {"contextual": contextual[: m.num_prompts["contextual"]], "complex": complex_[: m.num_prompts["complex"]]}
    folder = family.samples_folder(checkpoint, steps, guidance, 0)
    pipe = _pipeline(pipes, hp, family, device).to(device)
    api.load(pipe, ckpt)
    try:
        for name, templates in {"base": [BASE_PROMPT], **groups}.items():
            cfg = generation.Sampling(m.placeholder_token, concept["class_name"], folder, m.images[name], 1, steps,
                                      guidance, m.seed, call_kwargs=family.call_kwargs(hp))
            generation.run(pipe, templates, cfg, str(checkpoint))
    finally:
        api.unload(pipe)
        pipe.to("cpu")  # the next job's training subprocess gets the GPU's memory
    return folder, groups


def run_job(m: Manifest, concept: dict, method: dict, embedders, device: str, pipes: dict) -> dict:
    from tlora.evaluation.evaluate import evaluate_samples
    from tlora.evaluation.metrics import reference_images

    checkpoint = train_job(m, concept, method)
    samples, groups = generate_job(m, concept, checkpoint, device, pipes)
    refs = reference_images(concept["image"], m.evaluation.get("mask_dir"))
    metrics = evaluate_samples(embedders, refs, samples, concept["class_name"], m.placeholder_token, groups)
    return {"concept": concept["name"], "method": method["name"], "kind": concept.get("kind", "live"),
            **{k: metrics.get(k) for k in METRICS}, "checkpoint": str(checkpoint)}


def result_path(m: Manifest, concept: dict, method: dict) -> Path:
    name = f"{safe_component(str(concept['name']))}__{safe_component(str(method['name']))}.json"
    return m.output_dir / "results" / name


def collect(m: Manifest, write: bool = True) -> list[dict]:
    """Every finished job's row, in manifest order; rewrites results.csv when `write` (the main process)."""
    rows = [json.loads(p.read_text()) for c, me in m.jobs() if (p := result_path(m, c, me)).is_file()]
    if write:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(m.output_dir / "results.csv", buf.getvalue().encode())
    return rows


def summary(rows: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """method -> metric -> (mean, std over concepts)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        values = {k: [r[k] for r in rows if r["method"] == method and r[k] is not None] for k in METRICS}
        out[method] = {k: (statistics.fmean(v), statistics.pstdev(v)) for k, v in values.items() if v}
    return out


def write_report(m: Manifest, rows: list[dict]) -> tuple[Path, Path]:
    """results.md (mean ± std per method) and is_vs_ts.png (one point per method)."""
    from tlora.evaluation.analyze import pyplot

    plt = pyplot()
    stats = summary(rows)
    lines = ["| method | concepts | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for method, s in stats.items():
        n = sum(r["method"] == method for r in rows)
        cells = [f"{s[k][0]:.4f} ± {s[k][1]:.4f}" if k in s else "" for k in METRICS]
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
    md = m.output_dir / "results.md"
    atomic_write(md, ("\n".join(lines) + "\n").encode())
    fig, ax = plt.subplots(figsize=(5, 4))
    for method, s in stats.items():
        if "IS" in s and "TS_contextual" in s:
            ax.scatter(s["TS_contextual"][0], s["IS"][0], s=40)
            ax.annotate(method, (s["TS_contextual"][0], s["IS"][0]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("TS (text similarity, contextual prompts)")
    ax.set_ylabel("IS (image similarity)")
    ax.set_title("Concept fidelity vs text alignment")
    fig.tight_layout()
    png = m.output_dir / "is_vs_ts.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return md, png


def log_report(m: Manifest, md: Path, png: Path, rows: list[dict]) -> None:
    if m.report_to != "wandb":
        return
    import wandb

    run = wandb.init(project=m.project_name, name="benchmark", dir=str(m.output_dir))
    run.log({"results": wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows]),
             "is_vs_ts": wandb.Image(str(png))})
    run.finish()


def parse_args(argv: list[str] | None = None) -> Manifest:
    """The manifest, with every job's train.py flags checked before anything is trained or loaded."""
    from tlora.train.options import parse_args as train_args

    p = Parser(description=__doc__.splitlines()[0], epilog="Manifest format: see the module docstring "
               "(python -c 'import tlora.evaluation.protocol as p; print(p.__doc__)') or README.md.")
    p.add_argument("manifest", help="YAML file: output_dir, concepts, methods, and generation settings.")
    m = Manifest.read(p.parse_args(argv).manifest)
    for concept, method in m.jobs():
        try:
            train_args(train_flags(m, concept, method))
        except UsageError as err:
            raise UsageError(f"manifest: {concept['name']} x {method['name']}: {err}") from None
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
        print(f"{concept['name']} x {method['name']}: " + ", ".join(f"{k} {row[k]:.4f}" for k in METRICS
                                                                     if row[k] is not None))
    state.wait_for_everyone()
    rows = collect(m, write=state.is_main_process)
    if state.is_main_process:
        md, png = write_report(m, rows)
        log_report(m, md, png, rows)
        print(md.read_text())
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_command(parse_args, run, None, argv)


if __name__ == "__main__":
    sys.exit(main())
