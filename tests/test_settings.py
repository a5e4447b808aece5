"""TLoRASettings: conversions to and from every place settings live, validation, and r(t) as each tool rounds it."""

import pytest
import torch
import yaml

from tlora.common.errors import UsageError
from tlora.formats.lycoris import known_from_lycoris
from tlora.method.adapters import RANK_RULES, active_rank, rank_mask
from tlora.method.settings import TLoRASettings
from tlora.runs.hparams import (
    from_hparams,
    hparams_kind,
    known_from_hparams,
    known_from_ours,
    known_from_overrides,
    settings_from_known,
    to_hparams,
)

import authors
from helpers import SHARED

FLUX_TLORA = TLoRASettings("lora", 8, 4, 1.0, True, "flux", rank_rule="multiply_first")
SDXL_TLORA = TLoRASettings("ortho_lora", 64, 32, 0.5, True, "sdxl", sig_type="middle", rank_rule="divide_first")


@pytest.mark.parametrize("settings", [
    FLUX_TLORA, SDXL_TLORA, TLoRASettings("ortho_lora", 4, 2, 1.0, False, "flux", rank_rule="multiply_first")])
def test_metadata_and_hparams_round_trip(settings):
    meta = settings.to_metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert (meta["max_rank"], meta["alpha"]) == (str(settings.lora_rank), str(settings.alpha_rank_scale))  # ComfyUI
    assert settings_from_known(known_from_ours(meta, "file")) == settings
    hparams = yaml.safe_load(yaml.safe_dump(to_hparams(settings)))
    assert from_hparams(hparams) == settings and hparams_kind(hparams) == "tlora"


def test_our_flux_hparams_carry_the_authors_flux_keys():
    hparams = to_hparams(FLUX_TLORA)
    assert (hparams["tlora"], hparams["rank"], hparams["min_rank"], hparams["trainer_class"]) == (True, 8, 4, "flux_tlora")
    assert "tlora" not in to_hparams(SDXL_TLORA) and "rank" not in to_hparams(SDXL_TLORA)


def test_the_authors_flux_hparams():
    """Their keys: tlora (mask or not), rank, min_rank; no family, trainer_type, trainer_class or alpha."""
    assert hparams_kind(authors.FLUX_HPARAMS) == "authors-flux"
    assert from_hparams(authors.FLUX_HPARAMS) == FLUX_TLORA
    plain = from_hparams(authors.FLUX_HPARAMS | {"tlora": False, "rank": 16, "min_rank": 16})
    assert (plain.trainer_class, plain.lora_rank) == ("flux_lora", 16)


def test_the_authors_sdxl_hparams():
    theirs = {"trainer_type": "ortho_lora", "trainer_class": "sdxl_tlora", "lora_rank": 8, "min_rank": 4,
              "alpha_rank_scale": 1.0, "sig_type": "last", "wandb_api_key": None}
    assert hparams_kind(theirs) == "authors-sdxl"
    assert from_hparams(theirs) == TLoRASettings("ortho_lora", 8, 4, 1.0, True, "sdxl", rank_rule="divide_first")


@pytest.mark.parametrize("name", ["flux_hparams.yml", "sdxl_hparams.yml"])
def test_the_hparams_files_the_authors_tools_wrote(name):
    path = SHARED / "authors_runs" / name
    if not path.is_file():
        pytest.skip("../shared/authors_runs is not here")
    values = yaml.safe_load(path.read_text())
    settings = from_hparams(values, str(path))
    if name.startswith("flux"):
        assert set(values) == set(authors.FLUX_HPARAMS)  # our copy of their key set is complete
        assert settings == FLUX_TLORA
    else:
        assert settings == TLoRASettings("ortho_lora", 8, 4, 1.0, True, "sdxl", rank_rule="divide_first")


def test_lycoris_config():
    known = known_from_lycoris({"algo": "tlora", "linear_dim": 16, "linear_alpha": 8, "tlora_min_rank": 4}, 16, "f")
    settings = settings_from_known(known | {"family": "sdxl"})
    # SimpleTuner's defaults
    assert (settings.min_rank, settings.alpha_rank_scale, settings.rule) == (4, 1.0, "float64")
    with pytest.raises(UsageError, match="algo 'lokr', not a T-LoRA"):
        known_from_lycoris({"algo": "lokr"}, 4, "f")


@pytest.mark.parametrize("settings, message", [
    (TLoRASettings("lora", 4, 5), "min_rank (5) must not exceed lora_rank (4)"),
    (TLoRASettings("lora", 0), "lora_rank must be a whole number of at least 1, got 0"),
    (TLoRASettings("dora", 4), "trainer_type must be one of lora, ortho_lora, got 'dora'"),
    (TLoRASettings("lora", 4, alpha_rank_scale=float("inf")), "alpha_rank_scale must be a finite number > 0"),
])
def test_validate_names_the_setting(settings, message):
    with pytest.raises(UsageError) as err:
        settings.validate()
    assert message in str(err.value)
    with pytest.raises(UsageError, match="--"):
        settings.validate(flags=True)


@pytest.mark.parametrize("values, message", [
    ({"trainer_class": "sdxl_tlora", "family": "flux"}, "does not match family flux"),
    ({"lora_rank": "four"}, "lora_rank must be int, got 'four'"),
    ({"trainer_class": "tlora"}, "trainer_class must be one of sdxl_lora, sdxl_tlora, flux_lora, flux_tlora"),
    ({"family": "pixart"}, "family must be one of sdxl, flux, klein"),
])
def test_bad_records_are_one_line(values, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        known_from_hparams(values, "h.yml")


def test_a_family_s_rank_rule_is_never_guessed():
    """The rules differ by one component at some t: settings naming a family carry its rule, or refuse to mask."""
    with pytest.raises(ValueError, match="for_family"):
        TLoRASettings("lora", 8, 2, family="flux").rule  # noqa: B018
    assert TLoRASettings("lora", 8, 2).for_family("flux", "multiply_first").rule == "multiply_first"
    assert TLoRASettings("lora", 8, 2, rank_rule="float64").for_family("flux", "multiply_first").rule == "float64"
    klein = from_hparams({"trainer_class": "klein_tlora", "trainer_type": "lora", "lora_rank": 4})
    assert klein.rule == "multiply_first"


def test_unknown_settings_are_refused():
    with pytest.raises(UsageError, match="unknown setting 'min_rnak'"):
        known_from_overrides({"min_rnak": 2})
    assert known_from_overrides({"min_rank": None, "trainer_class": "flux_lora"}) == {
        "family": "flux", "timestep_dependent": False}


def test_each_tool_rounds_r_of_t_its_own_way():
    """All three are the paper's formula; float rounding differs at some t, so each file is masked as its tool masks."""
    t = torch.arange(1000)
    for span in (0, 3, 31, 50, 63, 75, 127):  # 50 and 75 round differently somewhere in one of the rules
        theirs_flux = [authors.their_rank(float(x), span + 1, 1) for x in range(1000)]
        assert active_rank(t, 1000, span + 1, 1, rule="multiply_first").tolist() == theirs_flux
        sdxl = [int(((1000 - x) / 1000) ** 1.0 * span) + 1 for x in torch.arange(1000, dtype=torch.float32)]
        assert active_rank(t, 1000, span + 1, 1, rule="divide_first").tolist() == sdxl  # their SDXL code, in float32
    flux, sdxl_rule = (active_rank(160, 1000, 76, 1, rule=rule) for rule in ("multiply_first", "divide_first"))
    assert flux == 64 != sdxl_rule


def test_the_lycoris_rule_is_lycoris_own():
    lycoris = pytest.importorskip("lycoris.modules.tlora")
    for rank, min_rank, alpha in ((51, 1, 1.0), (64, 32, 1.0), (16, 1, 2.0)):
        expected = [int(lycoris.compute_timestep_mask(x, 1000, rank, min_rank, alpha).sum()) for x in range(1000)]
        assert active_rank(torch.arange(1000), 1000, rank, min_rank, alpha, rule="float64").tolist() == expected
    assert active_rank(420, 1000, 51, 1, rule="float64") != active_rank(420, 1000, 51, 1, rule="divide_first")
    assert active_rank(999.7, 1000, 8, 1, rule="float64") == active_rank(999, 1000, 8, 1, rule="float64")  # int(t)


@pytest.mark.parametrize("rule", list(RANK_RULES))
@pytest.mark.parametrize("rank, min_rank, alpha", [(64, 32, 1.0), (76, 1, 1.0), (51, 1, 1.0), (16, 1, 2.0), (8, 8, 0.5)])
def test_the_settings_schedule_and_mask_are_the_functions(rule, rank, min_rank, alpha):
    """TLoRASettings.active_rank / mask give exactly what active_rank / rank_mask give, at every t and for each rule;
    the shape of t in, a number for a number."""
    settings = TLoRASettings("lora", rank, min_rank, alpha, rank_rule=rule)
    t = torch.arange(1000)
    expected = active_rank(t, 1000, rank, min_rank, alpha, rule)
    assert torch.equal(settings.active_rank(t), expected) and settings.active_rank(t).dtype == torch.int64
    assert torch.equal(settings.mask(t), rank_mask(t, 1000, rank, min_rank, alpha, rule))
    assert settings.active_rank(420) == int(expected[420]) and isinstance(settings.active_rank(420), int)
    assert settings.active_rank(t.reshape(10, 100)).shape == (10, 100) and settings.mask(t[:6].reshape(2, 3)).shape == (
        2, 3, rank)
    assert torch.equal(settings.mask(torch.tensor(420.0)), rank_mask(420.0, 1000, rank, min_rank, alpha, rule)[0])


def test_without_the_mask_every_component_is_active():
    settings = TLoRASettings("ortho_lora", 8, 2, timestep_dependent=False, family="flux")
    t = torch.arange(1000)
    assert torch.equal(settings.active_rank(t), torch.full((1000,), 8)) and settings.active_rank(999.5) == 8
    assert torch.equal(settings.mask(t), torch.ones(1000, 8))
