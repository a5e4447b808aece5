"""The authors' checkpoint keys, shapes, metadata, atomic writes and exact round trips."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from safetensors import safe_open
from safetensors.torch import save_file

from tlora.families import attach
from tlora.method.settings import TLoRASettings
from tlora.runs.keys import infer_rank, infer_trainer_type
from tlora.runs.weights import WEIGHTS_NAME, save_weights

from helpers import perturb, read_weights

PARAMS = {
    "lora": lambda i, o, r: {"down.weight": (r, i), "up.weight": (o, r)},
    "ortho_lora": lambda i, o, r: {
        "q_layer.weight": (r, i), "p_layer.weight": (o, r), "lambda_layer": (1, r),
        "base_q.weight": (r, i), "base_p.weight": (o, r), "base_lambda": (1, r),
    },
}


def expected_keys(unet, trainer_type, rank):
    keys = {}
    for name, m in unet.named_modules():
        if isinstance(m, Attention):
            for proj, short in ((m.to_q, "q"), (m.to_k, "k"), (m.to_v, "v"), (m.to_out[0], "out")):
                r = min(rank, proj.in_features, proj.out_features)
                for param, shape in PARAMS[trainer_type](proj.in_features, proj.out_features, r).items():
                    keys[f"{name}.processor.to_{short}_lora.{param}"] = shape
    return keys


@pytest.mark.parametrize("trainer_type", ["lora", "ortho_lora"])
def test_checkpoint_keys_and_shapes(unet, tmp_path, trainer_type):
    tlora = attach(unet, TLoRASettings(trainer_type, 4, 2))
    path = save_weights(tlora.state_dict(), tmp_path, {"trainer_type": trainer_type, "lora_rank": 4})
    tensors, meta = read_weights(tmp_path)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_keys(unet, trainer_type, 4)
    assert all(v.dtype == torch.float32 for v in tensors.values())
    assert meta["format"] == "pt" and meta["trainer_type"] == trainer_type and meta["lora_rank"] == "4"
    assert any(k.startswith("down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.") for k in tensors)
    assert len(tensors) == len(tlora.layers) * (2 if trainer_type == "lora" else 6)
    assert infer_trainer_type(tensors) == trainer_type and infer_rank(tensors) == 4
    assert path.name == WEIGHTS_NAME and [p.name for p in tmp_path.iterdir()] == [WEIGHTS_NAME]


def test_authors_file_without_metadata_loads(unet, tiny_sdxl, tmp_path):
    tlora = attach(unet, TLoRASettings("ortho_lora", 4, 1))
    perturb(tlora)
    save_file(tlora.state_dict(), str(tmp_path / WEIGHTS_NAME), metadata={"format": "pt"})
    fresh = attach(UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet"), TLoRASettings("ortho_lora", 4, 1),
                   init=False)
    fresh.load_state_dict(read_weights(tmp_path)[0])
    assert all(torch.equal(v, tlora.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_load_names_the_first_bad_key(unet):
    tlora = attach(unet, TLoRASettings("lora", 4, 1))
    sd = tlora.state_dict()
    first = next(iter(sd))
    missing = dict(sd)
    del missing[first]
    with pytest.raises(KeyError, match=first.replace(".", r"\.")):
        tlora.load_state_dict(missing)
    wrong = dict(sd, **{first: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        tlora.load_state_dict(wrong)
    with pytest.raises(KeyError, match="extra_key"):
        tlora.load_state_dict(dict(sd, extra_key=torch.zeros(1)))


def test_write_is_atomic(tmp_path, monkeypatch):
    save_weights({"a": torch.ones(2)}, tmp_path)
    import tlora.common.files as ck

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "replace", broken)
    with pytest.raises(OSError):
        save_weights({"a": torch.zeros(2)}, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [WEIGHTS_NAME]  # no temp file left, old file intact
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        assert torch.equal(f.get_tensor("a"), torch.ones(2))
