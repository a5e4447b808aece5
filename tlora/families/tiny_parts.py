"""Pieces shared by the families' tiny random models (tests and the CPU demo): small tokenizers of each kind the
published models use, the text width, and the FLUX models' flow-matching scheduler configuration."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import CLIPTextConfig, CLIPTokenizer, Qwen2Tokenizer, T5TokenizerFast

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


def clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """The small CLIP tokenizer, written to `folder` and read back from there."""
    write_tokenizer(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def clip_text_config(vocab_size: int, projection: bool) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_DIM if projection else 512,
        hidden_act="gelu", bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )


def t5_tokenizer() -> T5TokenizerFast:
    """A small unigram T5 tokenizer: the special tokens, a few whole words, and single letters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


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
