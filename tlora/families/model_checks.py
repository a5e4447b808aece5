"""Checks of a model's own files before any model loads: a VAE of the model's family (`check_vae`), prompts that
a text encoder will cut (`long_prompts`), and the JSON configs both read (`read_json`, `cached_file`).

They read small files only (configs, tokenizers), from a local folder or the Hugging Face cache; never the
network, never a model's weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlora.common.errors import UsageError
from tlora.common.files import check_folder
from tlora.common.hub import HUB_ID
from tlora.common.text_files import parse_json, read_json
from tlora.common.values import shown

VAE_FIX = "pass a VAE of the model's family, or none for the model's own"
# (the VAE's class, its latent channels) -> the models that use such a VAE
VAE_FAMILIES = {("AutoencoderKL", 4): "SD / SDXL", ("AutoencoderKL", 16): "FLUX.1",
                ("AutoencoderKLFlux2", 32): "FLUX.2"}


def cached_file(name: str, filename: str, revision: str | None = None) -> Path | None:
    """`filename` of a local model folder, or of a hub repository as the Hugging Face cache holds it; None when it
    cannot be had without the network (or the folder has none)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path / filename if (path / filename).is_file() else None
    if path.exists() or not HUB_ID.match(name):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, filename, revision=revision)
    except ValueError:  # a name the hub's own checks refuse: nothing cached under it
        return None
    return Path(found) if isinstance(found, str) else None


# -- the VAE ----------------------------------------------------------------------------------------
def _vae_kind(config: dict) -> str:
    cls, channels = config.get("_class_name"), config.get("latent_channels")
    text = f"{cls if isinstance(cls, str) else 'a VAE'} with {shown(channels)} latent channels"
    family = VAE_FAMILIES.get((cls, channels)) if isinstance(channels, int) else None
    return f"{text} (as {family} models use)" if family else text


def check_vae(flag: str, vae: str | None, model: str, revision: str | None) -> None:
    """Refuse a VAE of another family than the model's, before any model loads.

    Called from train.py's checks (`tlora.train.checks.check_inputs`) and from inference.py's `parse_args`, with
    `flag` the flag that named the VAE (--pretrained_vae_model_name_or_path). `vae` None, '' or 'none' means the
    model's own: nothing to check. The VAE's config.json (a local folder, or the Hugging Face cache for a hub id)
    and the model's own vae/config.json (its folder, or the cache at `revision`) are compared: `_class_name` and
    `latent_channels`, where both give them. Raises a one-line UsageError for a mismatch, a VAE path that does not
    exist or has no config.json, and a config that is not UTF-8 JSON. Returns silently when either config cannot
    be had without the network (a hub id not in the cache): loading reports what it finds then.
    """
    if not vae or vae.lower() == "none":
        return
    path = Path(vae).expanduser()
    fix = "pass a VAE folder in diffusers layout (with config.json) or a hub id, or none for the model's own"
    if path.exists():
        check_folder(flag, path, fix)
        if not (path / "config.json").is_file():
            raise UsageError(f"{flag}: {vae} has no config.json; {fix}")
    if not path.exists() and not HUB_ID.match(vae):
        raise UsageError(f"{flag}: {vae} does not exist; {fix}")
    vae_config_path = cached_file(vae, "config.json")
    model_config_path = cached_file(model, "vae/config.json", revision)
    if vae_config_path is None or model_config_path is None:
        return
    config = read_json(vae_config_path, flag, fix)
    own = read_json(model_config_path, f"{model}'s own VAE", "fix or download the model again")
    differs = [key for key in ("_class_name", "latent_channels")
               if key in config and key in own and config[key] != own[key]]
    if differs:
        raise UsageError(f"{flag}: {vae} is {_vae_kind(config)}, but {model} is made for {_vae_kind(own)}; {VAE_FIX}")


# -- prompts a text encoder cuts -------------------------------------------------------------------------
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's and Flux2KleinPipeline's default and limit


def _tokenizer(model: str, revision: str | None, subfolder: str, index: dict):
    """The pipeline's tokenizer in `subfolder` (the class model_index.json names, else AutoTokenizer), from a local
    folder or the cache only; None when it cannot be had so."""
    import transformers

    local = Path(model).expanduser().is_dir()
    if not local and cached_file(model, f"{subfolder}/tokenizer_config.json", revision) is None:
        return None
    spec = index.get(subfolder)
    named = isinstance(spec, list) and len(spec) == 2 and spec[0] == "transformers" and isinstance(spec[1], str)
    # only a tokenizer class: any other transformers class's from_pretrained could load a model's weights
    cls = getattr(transformers, spec[1], None) if named and spec[1].endswith(("Tokenizer", "TokenizerFast")) else None
    if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
        cls = transformers.AutoTokenizer
    try:
        return cls.from_pretrained(model, subfolder=subfolder, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - missing or damaged files: loading the pipeline reports them in its own line
        return None


def _model_index(model: str, revision: str | None) -> dict:
    path = cached_file(model, "model_index.json", revision)
    if path is None:
        return {}
    try:
        index = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # the model's own check reports it
        return {}
    return index if isinstance(index, dict) else {}


def _count(tokenizer, prompt: str, chat: bool) -> int:
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False)
    return len(tokenizer(prompt, verbose=False)["input_ids"])  # verbose: no warning that it is long


def long_prompts(model: str, revision: str | None, family: Any, prompts: list[str],
                 max_sequence_length: int | None) -> list[str]:
    """One note line for each prompt that one of the pipeline's text encoders reads only in part (the rest is cut).

    Called from train.py's checks (validation prompts) and from inference.py's `parse_args` (its prompts), before
    any model loads; the caller says each line with `tlora.common.messages.note`. `family` is the model's
    `tlora.families.Family`; `max_sequence_length` the T5 / Qwen3 length the pipeline is called with (None: the
    pipelines' default, 512; SDXL has none). Tokens are counted as the family's diffusers pipeline tokenizes:
    with the tokenizer's special tokens (CLIP's start and end, T5's end) and, on klein, inside its chat
    template; CLIP reads its model_max_length (77). Only tokenizers are loaded, from the model folder or the
    Hugging Face cache (never the network): a tokenizer that cannot be had so is skipped. Prompts given twice
    are said once.
    """
    recipe = family
    length = max_sequence_length or MAX_SEQUENCE_LENGTH
    index = _model_index(model, revision)
    readers = []
    for subfolder, label, limit, chat in recipe.tokenizers:
        tokenizer = _tokenizer(model, revision, subfolder, index)
        if tokenizer is not None:
            readers.append((tokenizer, label, length if limit else tokenizer.model_max_length, chat))
    notes = []
    for prompt in dict.fromkeys(prompts):
        cut = [(label, _count(tokenizer, prompt, chat), limit) for tokenizer, label, limit, chat in readers]
        cut = [(label, n, limit) for label, n, limit in cut if n > limit]
        if not cut:
            continue
        if len({(n, limit) for _, n, limit in cut}) == 1:
            _, n, limit = cut[0]
            labels = " and ".join(label for label, _, _ in cut)
            said = f"is {n} tokens; {labels} read{'s' if len(cut) == 1 else ''} {limit}, the rest is cut"
        else:
            said = "is " + ", and ".join(f"{n} tokens for {label}, which reads {limit}" for label, n, limit in cut)
            said += "; the rest is cut"
        notes.append(f"the prompt {shown(prompt)} {said}; shorten it")
    return notes
