"""PruMergeConfig: one validated object, clear errors naming the bad field."""

from __future__ import annotations

import dataclasses
import math

import pytest

from vllm_prumerge.config import PruMergeConfig


def test_defaults_are_the_reference_prumerge():
    config = PruMergeConfig()
    assert config.mode == "prumerge"
    assert config.iqr_multiplier == 1.5
    assert config.k_neighbors == 32
    assert config.merge_weighting == "reference"
    assert config.order == "reference"
    assert config.min_tokens == 1
    assert config.budget is None and config.budget_ratio is None
    assert config.spatial_samples is False
    assert config.enabled and config.adaptive and not config.uses_spatial_samples


@pytest.mark.parametrize(
    "given", ["prumerge+", "PruMerge+", "prumerge_plus", "prumerge-plus", " PRUMERGE_PLUS "]
)
def test_mode_aliases_normalise_to_prumerge_plus(given):
    config = PruMergeConfig(mode=given)
    assert config.mode == "prumerge+"
    assert config.uses_spatial_samples


def test_mode_off_is_not_enabled():
    assert not PruMergeConfig(mode="OFF").enabled


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PruMergeConfig().mode = "off"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"mode": "tome"}, "mode"),
        ({"mode": 3}, "mode"),
        ({"iqr_multiplier": -1}, "iqr_multiplier"),
        ({"iqr_multiplier": math.nan}, "iqr_multiplier"),
        ({"iqr_multiplier": math.inf}, "iqr_multiplier"),
        ({"iqr_multiplier": True}, "iqr_multiplier"),
        ({"k_neighbors": 0}, "k_neighbors"),
        ({"k_neighbors": 2.5}, "k_neighbors"),
        ({"merge_weighting": "mean"}, "merge_weighting"),
        ({"order": "random"}, "order"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"mode": "fixed", "budget": -3}, "budget"),
        ({"mode": "fixed", "budget_ratio": 0.0}, "budget_ratio"),
        ({"mode": "fixed", "budget_ratio": 1.5}, "budget_ratio"),
        ({"mode": "fixed", "budget": 64, "spatial_samples": "yes"}, "spatial_samples"),
    ],
)
def test_invalid_values_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"PruMergeConfig\.{field}\b"):
        PruMergeConfig(**overrides)


def test_the_documented_error_message_reads_as_promised():
    with pytest.raises(ValueError) as info:
        PruMergeConfig(iqr_multiplier=-1)
    assert str(info.value) == "PruMergeConfig.iqr_multiplier must be a finite number >= 0, got -1"


def test_fixed_mode_needs_exactly_one_of_budget_and_ratio():
    with pytest.raises(ValueError, match="exactly one"):
        PruMergeConfig(mode="fixed")
    with pytest.raises(ValueError, match="exactly one"):
        PruMergeConfig(mode="fixed", budget=64, budget_ratio=0.1)
    assert PruMergeConfig(mode="fixed", budget=64).budget == 64
    assert PruMergeConfig(mode="fixed", budget_ratio=0.25).budget_ratio == 0.25


@pytest.mark.parametrize("mode", ["prumerge", "prumerge+", "off"])
def test_budget_and_spatial_samples_are_rejected_outside_fixed_mode(mode):
    with pytest.raises(ValueError, match=r"PruMergeConfig\.budget\b"):
        PruMergeConfig(mode=mode, budget=64)
    with pytest.raises(ValueError, match=r"PruMergeConfig\.budget_ratio\b"):
        PruMergeConfig(mode=mode, budget_ratio=0.5)
    with pytest.raises(ValueError, match=r"PruMergeConfig\.spatial_samples\b"):
        PruMergeConfig(mode=mode, spatial_samples=True)


def test_fixed_mode_with_spatial_samples_uses_them():
    config = PruMergeConfig(mode="fixed", budget=32, spatial_samples=True)
    assert config.uses_spatial_samples and not config.adaptive


def test_from_dict_round_trips_to_dict():
    config = PruMergeConfig(
        mode="fixed", budget_ratio=0.125, spatial_samples=True, order="raster", k_neighbors=8
    )
    assert PruMergeConfig.from_dict(config.to_dict()) == config


def test_from_dict_rejects_unknown_keys_naming_them():
    with pytest.raises(ValueError, match=r"unknown option.*k_neighbours.*ratio"):
        PruMergeConfig.from_dict({"k_neighbours": 16, "ratio": 0.1})


def test_from_dict_coerces_cli_strings():
    config = PruMergeConfig.from_dict(
        {
            "mode": "Fixed",
            "k_neighbors": "16",
            "iqr_multiplier": "2",
            "min_tokens": "4",
            "budget": "64",
            "budget_ratio": "none",
            "spatial_samples": "true",
            "merge_weighting": "Normalized",
            "order": "RASTER",
        }
    )
    assert config == PruMergeConfig(
        mode="fixed",
        k_neighbors=16,
        iqr_multiplier=2.0,
        min_tokens=4,
        budget=64,
        spatial_samples=True,
        merge_weighting="normalized",
        order="raster",
    )
    assert PruMergeConfig.from_dict({"mode": "fixed", "budget": 8, "spatial_samples": "0"}) == (
        PruMergeConfig(mode="fixed", budget=8)
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("k_neighbors", "many"), ("iqr_multiplier", "wide"), ("spatial_samples", "maybe")],
)
def test_from_dict_uncoercible_strings_name_the_field(key, value):
    data = {key: value, **({"mode": "fixed", "budget": 8} if key == "spatial_samples" else {})}
    with pytest.raises(ValueError, match=rf"PruMergeConfig\.{key}\b"):
        PruMergeConfig.from_dict(data)


def test_from_dict_rejects_non_mappings():
    with pytest.raises(TypeError):
        PruMergeConfig.from_dict([("mode", "off")])  # type: ignore[arg-type]


def test_replace_revalidates():
    config = PruMergeConfig()
    assert config.replace(mode="prumerge_plus").mode == "prumerge+"
    with pytest.raises(ValueError, match=r"PruMergeConfig\.k_neighbors\b"):
        config.replace(k_neighbors=0)
    with pytest.raises(ValueError, match="unknown option"):
        config.replace(neighbours=3)


def test_every_field_is_documented_in_the_class_docstring():
    doc = PruMergeConfig.__doc__ or ""
    for field in dataclasses.fields(PruMergeConfig):
        assert f"\n    {field.name} (" in doc, field.name
