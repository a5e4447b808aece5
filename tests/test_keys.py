"""Our checkpoint keys (tlora.runs.keys): taken apart, grouped by adapter, and what they show."""

import pytest
import torch

from tlora.common.errors import CheckpointError
from tlora.method.adapters import PARAMS, make_adapter
from tlora.runs.keys import (
    flatten,
    group,
    infer_rank,
    infer_trainer_type,
    layer_ranks,
    matrices,
    not_ours,
    split_key,
    without_adapters,
)
from tlora.runs.reading import read
from tlora.runs.weights import save_weights

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"


def checkpoint(trainer_type: str, ranks: dict[str, tuple[int, int, int]]) -> dict[str, torch.Tensor]:
    """A flat checkpoint: one adapter per prefix (rank, in, out), keys as TLoRA.state_dict writes them."""
    torch.manual_seed(0)
    return {f"{prefix}.{name}": value for prefix, (rank, n_in, n_out) in ranks.items()
            for name, value in make_adapter(trainer_type, n_in, n_out, rank).state_dict().items()}


LAYERS = {f"{ATTN}.to_q_lora": (4, 12, 10), f"{ATTN}.to_out_lora": (3, 10, 3)}


@pytest.mark.parametrize("trainer_type", ["lora", "ortho_lora"])
def test_keys_split_into_adapter_and_parameter(trainer_type):
    tensors = checkpoint(trainer_type, LAYERS)
    assert {split_key(k) for k in tensors} == {(prefix, name) for prefix in LAYERS for name in PARAMS[trainer_type]}
    assert split_key(f"{ATTN}.to_q_lora.base_q.weight") == (f"{ATTN}.to_q_lora", "base_q.weight")
    assert split_key(f"{ATTN}.to_q_lora.q_layer.weight") == (f"{ATTN}.to_q_lora", "q_layer.weight")


@pytest.mark.parametrize("key", ["down.weight", f"{ATTN}.to_q_lora.lora_A.weight", f"{ATTN}.to_q_lora.alpha",
                                 "lora_unet_input_blocks_4_1_attn1_to_q.lora_down.weight", f"{ATTN}.to_q_lora"])
def test_a_key_that_is_not_ours(key):
    assert split_key(key) is None and not_ours([key]) == [key]
    with pytest.raises(ValueError, match="is not a T-LoRA checkpoint key"):
        group({key: torch.zeros(1)})


@pytest.mark.parametrize("trainer_type", ["lora", "ortho_lora"])
def test_group_by_adapter_and_back(trainer_type):
    tensors = checkpoint(trainer_type, LAYERS)
    adapters = group(tensors)
    assert list(adapters) == list(LAYERS) and all(set(p) == set(PARAMS[trainer_type]) for p in adapters.values())
    assert flatten(adapters) == tensors
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    assert group(shapes)[f"{ATTN}.to_q_lora"][PARAMS[trainer_type][0]] == (4, 12)  # shapes group as well


@pytest.mark.parametrize("trainer_type", ["lora", "ortho_lora"])
def test_trainer_type_and_ranks_the_keys_show(trainer_type):
    tensors = checkpoint(trainer_type, LAYERS)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    assert infer_trainer_type(tensors) == infer_trainer_type(shapes) == trainer_type
    assert infer_rank(tensors) == infer_rank(shapes) == 4
    assert layer_ranks(shapes) == LAYERS
    assert set(matrices(shapes)) == {k for k in shapes if k.endswith(".weight")}


def test_keys_with_no_down_projection_show_no_trainer_type():
    with pytest.raises(CheckpointError, match="f.safetensors has neither q_layer.weight nor down.weight tensors"):
        infer_trainer_type([f"{ATTN}.to_q_lora.up.weight"], "f.safetensors")


def test_without_adapters_drops_whole_adapters_only():
    tensors = checkpoint("lora", LAYERS) | {"stray": torch.zeros(1)}
    kept = without_adapters(tensors, lambda prefix: prefix.endswith("to_out_lora"))
    assert sorted(kept) == sorted([f"{ATTN}.to_q_lora.down.weight", f"{ATTN}.to_q_lora.up.weight", "stray"])


def test_the_reader_refuses_a_key_that_is_not_ours(tmp_path):
    tensors = checkpoint("lora", LAYERS) | {f"{ATTN}.to_q_lora.lora_A.weight": torch.zeros(4, 12)}
    save_weights(tensors, tmp_path)
    with pytest.raises(CheckpointError, match=r"lora_A.weight' is no T-LoRA adapter's parameter.*pass a T-LoRA"):
        read(tmp_path, quiet=True)
