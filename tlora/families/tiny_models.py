"""A tiny random SDXL, FLUX.1 or FLUX.2 [klein] in diffusers' folder layout, built in seconds with no download.

SDXL: the classes and wiring of stabilityai/stable-diffusion-xl-base-1.0 (two CLIP text encoders, the
second with a projection, a `text_time` UNet, an SDXL scheduler config) at toy sizes. FLUX: those of
black-forest-labs/FLUX.1-dev (CLIP + T5 text encoders, a guidance-distilled FluxTransformer2DModel with
double- and single-stream blocks, a 16-channel VAE, the flow-matching scheduler config). klein: those of
black-forest-labs/FLUX.2-klein-base-4B (a Qwen3 text encoder with a byte-level BPE tokenizer and a chat
template, a Flux2Transformer2DModel without guidance embedding, AutoencoderKLFlux2 with its batch-norm
statistics, the flow-matching scheduler config). For tests and the CPU demo.
`python -m tlora.tiny FOLDER [sdxl|flux|klein]` writes one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

TEXT_DIM = 32
WORDS = ("a", "photo", "of", "sks", "dog", "cat", "riding", "bike", "swimming", "in", "the", "red", "on", "beach")


def _byte_alphabet() -> list[str]:
    """CLIP's byte-to-unicode table: 256 printable characters standing for the 256 bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tokenizer(folder: Path) -> None:
    """A small byte-level BPE CLIP tokenizer: every byte, plus whole-word merges for a few words."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merges.append(f"{pieces[0]} {pieces[1]}")
            if merged not in vocab_list:
                vocab_list.append(merged)
            pieces = [merged] + pieces[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")


def _text_config(vocab_size: int, projection: bool) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_DIM if projection else 512,
        hidden_act="gelu", bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )


def build_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SDXL to `folder` (loadable by StableDiffusionXLPipeline.from_pretrained)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    write_tokenizer(folder / "_tok")
    tokenizer = CLIPTokenizer(str(folder / "_tok/vocab.json"), str(folder / "_tok/merges.txt"), model_max_length=77)
    vocab_size = len(tokenizer)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM, cross_attention_dim=2 * TEXT_DIM, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64,
        scaling_factor=0.13025, force_upcast=False,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(_text_config(vocab_size, False)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(vocab_size, True)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
    )
    pipe.save_pretrained(folder)
    return folder


def t5_tokenizer() -> T5TokenizerFast:
    """A small unigram T5 tokenizer: the special tokens, a few whole words, and single letters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def build_tiny_flux(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random FLUX.1-dev-like model to `folder` (loadable by FluxPipeline.from_pretrained)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    write_tokenizer(folder / "_tok")
    tokenizer = CLIPTokenizer(str(folder / "_tok/vocab.json"), str(folder / "_tok/merges.txt"), model_max_length=77)
    t5_tok = t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 16, 16), in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        force_upcast=False,
    )
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    pipe = FluxPipeline(
        scheduler=flow_scheduler(), vae=vae, text_encoder=CLIPTextModel(_text_config(len(tokenizer), True)),
        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The FLUX models' flow-matching scheduler configuration."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


QWEN_SPECIAL = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
QWEN_CHAT = (  # Qwen3's chat template, reduced to what Flux2KleinPipeline uses
    "{%- for message in messages %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def qwen_tokenizer() -> Qwen2Tokenizer:
    """A small byte-level BPE Qwen tokenizer: every byte, whole-word merges for a few words (also after a space,
    'Ġword'), Qwen's special tokens and a chat template."""
    space, vocab, merges = "\u0120", _byte_alphabet(), []
    for word in WORDS:
        pieces = list(word)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            vocab.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    for word in WORDS:
        merges.append((space, word))
        vocab.append(space + word)
    tokens = {token: i for i, token in enumerate(dict.fromkeys(vocab + ["<|endoftext|>"]))}
    tokenizer = Qwen2Tokenizer(vocab=tokens, merges=list(dict.fromkeys(merges)))
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL)})
    tokenizer.chat_template = QWEN_CHAT
    return tokenizer


def build_tiny_klein(folder: str | Path, seed: int = 0, width: int = 16) -> Path:
    """Write a tiny random FLUX.2 [klein]-like model to `folder` (loadable by Flux2KleinPipeline.from_pretrained).
    `width` is the text encoder's hidden size (the prompt embeddings are three of its layers side by side)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(  # 27 layers: the pipeline stacks hidden states 9, 18 and 27
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=27,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKLFlux2(
        block_out_channels=(16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * width, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    pipe = Flux2KleinPipeline(scheduler=flow_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)
    pipe.save_pretrained(folder)
    return folder


BUILDERS = {"sdxl": build_tiny_sdxl, "flux": build_tiny_flux, "klein": build_tiny_klein}


def main(argv: list[str] | None = None) -> int:
    from tlora.common.commands import run_command
    from tlora.common.errors import UsageError
    from tlora.common.flags import Parser

    p = Parser(description="Write a tiny random model (diffusers layout) to FOLDER.")
    p.add_argument("folder", nargs="?", default=None, help="Default: tiny-<family>.")
    p.add_argument("family", nargs="?", default="sdxl", choices=sorted(BUILDERS))
    p.add_argument("--overwrite", action="store_true", default=False, help="Write into a folder that is not empty.")

    def parse(argv):
        args = p.parse_args(argv)
        args.folder = Path(args.folder or f"tiny-{args.family}")
        if args.folder.exists() and (not args.folder.is_dir() or any(args.folder.iterdir())) and not args.overwrite:
            raise UsageError(f"{args.folder} exists and is not an empty folder; pass a new folder, or --overwrite")
        return args

    return run_command(parse, lambda args: BUILDERS[args.family](args.folder), "written", argv)


if __name__ == "__main__":
    sys.exit(main())
