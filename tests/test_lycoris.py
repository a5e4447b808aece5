"""SimpleTuner / LyCORIS T-LoRA files load with tlora.load and give the output LyCORIS itself gives."""

import json
from types import SimpleNamespace

import pytest
import torch

import tlora
from tlora.interop import exporting

from helpers import sdxl_inputs

lycoris_tlora = pytest.importorskip("lycoris.modules.tlora")


def test_lycoris_tlora_gives_lycoris_output(tiny_sdxl, tmp_path, capsys, monkeypatch):
    from diffusers import UNet2DConditionModel
    from lycoris import LycorisNetwork, create_lycoris
    from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet").requires_grad_(False)
    monkeypatch.setattr(lycoris_tlora, "gc", SimpleNamespace(collect=lambda *a: 0))  # its 0.2 s per module, in the test
    LycorisNetwork.apply_preset({"target_module": ["Attention"]})
    torch.manual_seed(0)
    network = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2, algo="tlora")
    network.apply_to()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as if trained
        for module in network.loras:
            for p in (module.q_layer.weight, module.p_layer.weight, module.lambda_layer):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    config = {"algo": "tlora", "linear_dim": 4, "linear_alpha": 2, "tlora_min_rank": 2, "tlora_alpha": 1.0}
    path = tmp_path / "tlora_lycoris.safetensors"
    network.save_weights(str(path), torch.float32, {"lycoris_config": json.dumps(config)})

    inputs = sdxl_inputs(unet, batch=1)
    expected = {}
    with torch.no_grad():
        for t in (0, 600, 999):  # SimpleTuner's mask: linear_dim, tlora_min_rank, tlora_alpha at int(t)
            set_timestep_mask(compute_timestep_mask(t, 1000, 4, 2, 1.0))
            expected[t] = unet(timestep=t, **inputs).sample
            clear_timestep_mask()
    assert not torch.allclose(expected[0], expected[999])  # the mask matters

    ckpt = tlora.read(path)  # SimpleTuner's settings, read as SimpleTuner reads them
    assert ckpt.lycoris and ckpt.sources["min_rank"] == "the file's lycoris_config"
    assert (ckpt.settings.lora_rank, ckpt.settings.min_rank, ckpt.settings.rule) == (4, 2, "float64")
    fresh = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet").requires_grad_(False)
    with torch.no_grad():
        base = fresh(timestep=600, **inputs).sample
    gc = lycoris_tlora.gc
    loaded = tlora.load(fresh, path)
    assert lycoris_tlora.gc is gc  # tlora's own speed-up of LyCORIS's module building is undone
    assert len(loaded.layers) == len(network.loras) == 32
    with torch.no_grad():
        for t, out in expected.items():
            got = fresh(timestep=t, **inputs).sample
            assert (got - out).abs().max() <= 1e-5, t
    tlora.unload(fresh)
    with torch.no_grad():
        assert torch.equal(fresh(timestep=600, **inputs).sample, base)
    assert exporting.main([str(path), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 2
    assert "load it with tlora.load" in capsys.readouterr().err  # exports need our or the authors' keys
