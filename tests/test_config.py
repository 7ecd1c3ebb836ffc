"""Tests for emllm.config: validation messages, presets, the check against a model's trained context."""

from __future__ import annotations

import pytest
from conftest import tiny_model
from emllm import PRESETS, ConfigError, EMLLMConfig
from pydantic import ValidationError


def test_defaults_are_valid() -> None:
    config = EMLLMConfig()
    assert config.chunk_size <= config.n_local
    assert config.min_event_size <= config.max_event_size <= config.n_local
    assert config.memory_distance == config.n_local + config.chunk_size
    assert config.effective_surprise_window == config.n_local
    assert EMLLMConfig(surprise_window=50).effective_surprise_window == 50


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"n_local": 64, "chunk_size": 65}, ["chunk_size (65)", "n_local (64)"]),
        ({"min_event_size": 20, "max_event_size": 10}, ["min_event_size (20)", "max_event_size (10)"]),
        ({"n_local": 96, "chunk_size": 16, "max_event_size": 97}, ["max_event_size (97)", "n_local (96)"]),
        (
            {"n_local": 96, "chunk_size": 16, "max_event_size": 32, "block_size": 97},
            ["block_size (97)", "n_local (96)"],
        ),
        ({"contiguity_ratio": 1.0}, ["contiguity_ratio", "less than 1"]),
        ({"contiguity_ratio": -0.1}, ["contiguity_ratio"]),
        ({"gamma": -0.5}, ["gamma", "greater than or equal to 0"]),
        ({"refinement_layers": (3, 1)}, ["refinement_layers", "(3, 1)"]),
        ({"refinement_layers": (2, 2)}, ["refinement_layers", "(2, 2)"]),
        ({"refinement_layers": (-1, 2)}, ["refinement_layers", "(-1, 2)"]),
        ({"refinement_layers": (1, 2, 3)}, ["refinement_layers"]),
        ({"recall_layers": (3, 1)}, ["recall_layers", "(3, 1)"]),
        ({"question_recall": -1}, ["question_recall"]),
        ({"memory_positions": "relative"}, ["memory_positions"]),
        ({"n_locl": 512}, ["n_locl", "Extra inputs are not permitted"]),
        ({"segmentation": "tiling"}, ["segmentation", "surprise"]),
        ({"offload_dtype": "float8"}, ["offload_dtype"]),
        ({"n_local": 0}, ["n_local"]),
        ({"n_mem": 4, "min_event_size": 8}, ["n_mem (4)", "min_event_size 8"]),
    ],
)
def test_invalid_config_names_the_field(fields, words) -> None:
    with pytest.raises(ValidationError) as info:
        EMLLMConfig(**fields)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    missing = [w for w in words if w not in message]
    assert not missing, f"{missing} not in error message:\n{message}"


def test_boundary_values_are_valid() -> None:
    EMLLMConfig(n_local=64, chunk_size=64, min_event_size=64, max_event_size=64, block_size=64)
    EMLLMConfig(contiguity_ratio=0.0, gamma=0.0, n_mem=0, n_init=0, refinement_layers=(0, 1))


def test_config_is_frozen() -> None:
    config = EMLLMConfig()
    with pytest.raises(ValidationError, match="frozen"):
        config.n_local = 10
    assert config.n_local == 1024
    changed = config.model_copy(update={"n_mem": 10})
    assert changed.n_mem == 10 and config.n_mem == 1024


@pytest.mark.parametrize("name", ["llama-3-8b", "mistral-7b", "qwen2-7b"])
def test_presets_use_the_authors_8b_numbers(name) -> None:
    config = EMLLMConfig.preset(name)
    assert (config.n_init, config.n_local, config.chunk_size) == (128, 4096, 512)


def test_every_preset_is_valid() -> None:
    assert {"smollm2-135m", "llama-3-8b", "mistral-7b", "qwen2-7b"} <= set(PRESETS)
    for name in PRESETS:
        assert isinstance(EMLLMConfig.preset(name), EMLLMConfig)
    smol = EMLLMConfig.preset("smollm2-135m")
    smol.check_against_model(8192, "SmolLM2-135M")  # the bundled model's trained context


def test_preset_is_case_insensitive() -> None:
    assert EMLLMConfig.preset("Mistral-7B") == EMLLMConfig.preset("mistral-7b")


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        EMLLMConfig.preset("nope")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "'nope'" in message
    missing = [name for name in PRESETS if name not in message]
    assert not missing, f"presets {missing} not listed in: {message}"


def test_preset_overrides() -> None:
    config = EMLLMConfig.preset("llama-3-8b", n_mem=512, gamma=2.0)
    assert (config.n_mem, config.gamma) == (512, 2.0)
    assert (config.n_init, config.n_local, config.chunk_size) == (128, 4096, 512)
    again = EMLLMConfig.preset("llama-3-8b")
    assert again.n_mem == 2048 and again.gamma == 1.0, "an override leaked into the preset"
    with pytest.raises(ValidationError, match="chunk_size"):
        EMLLMConfig.preset("llama-3-8b", chunk_size=8192)


def test_check_against_model() -> None:
    config = EMLLMConfig(n_local=64, chunk_size=16, max_event_size=16)
    config.check_against_model(81, "tiny")  # positions 0..80 exist: memory_distance 80 fits
    config.check_against_model(None, "tiny")  # unknown trained context: nothing to check
    for limit in (80, 64, 8):
        with pytest.raises(ConfigError, match=r"80 .*tiny.*\(" + str(limit)):
            config.check_against_model(limit, "tiny")


def test_check_against_model_with_ordered_memory() -> None:
    """Ordered memory puts init + retrieved + window + chunk in one line of positions: all must fit."""
    config = EMLLMConfig(
        n_init=4, n_mem=48, n_local=64, chunk_size=16, max_event_size=16, memory_positions="ordered"
    )
    assert config.position_span == 4 + 48 + 64 + 16
    config.check_against_model(132, "tiny")
    with pytest.raises(ConfigError, match=r"n_init \+ n_mem \+ n_local \+ chunk_size = 132 .*tiny.*\(131"):
        config.check_against_model(131, "tiny")


def test_engine_refuses_a_window_beyond_the_trained_context(make_engine) -> None:
    with pytest.raises(ConfigError, match="trained context"):
        make_engine(model=tiny_model("llama", max_positions=64), n_local=64, chunk_size=16)
    engine = make_engine(model=tiny_model("llama", max_positions=81), n_local=64, chunk_size=16)
    assert engine.rotary.length == 81


@pytest.mark.parametrize("name", ["refinement_layers", "recall_layers"])
def test_engine_refuses_a_layer_band_past_the_model(make_engine, name) -> None:
    """A band that holds none of the model's layers used to pass and fail in the first feed (refinement
    stacked no keys) or silently rank with every layer (recall): refused when the engine is built."""
    for band in ((2, 4), (5, 9)):  # the tiny model has layers 0..1
        with pytest.raises(ConfigError, match=rf"{name} \({band[0]}, {band[1]}\) .*2 layers \(0\.\.1\)"):
            make_engine(**{name: band})
    engine = make_engine(**{name: (1, 9)})  # reaches past the last layer: clipped to layer 1
    engine.session().feed(list(range(40, 240)))
    assert EMLLMConfig(**{name: (5, 9)}).check_against_model(None, "tiny") is None  # no model: no check


def test_refinement_band() -> None:
    assert EMLLMConfig().refinement_band(8) == range(4, 8)
    assert EMLLMConfig(refinement_layers=(1, 3)).refinement_band(8) == range(1, 3)
    assert EMLLMConfig(refinement_layers=(6, 12)).refinement_band(8) == range(6, 8)
    assert EMLLMConfig().recall_band(30) == range(15, 30)
    assert EMLLMConfig(recall_layers=(2, 5)).recall_band(8) == range(2, 5)
