"""MageConfig: defaults, validation errors that name the flag, and the CLI / keyword / environment paths."""

import argparse
import json

import pytest

from sglang_mage import config
from sglang_mage.config import MageConfig, MageConfigError


def test_defaults():
    cfg = MageConfig()
    assert (cfg.k, cfg.selector, cfg.sparse_commit, cfg.force_sparse, cfg.pdl) == (512, "mean", True, False, "full")
    assert cfg.max_selected == 512 + cfg.sink_tokens + cfg.local_window
    assert MageConfig(selector="vote").max_selected == cfg.vote_max_k + cfg.sink_tokens + cfg.local_window


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("k", 0, "--mage-k"),
        ("k", -5, "--mage-k"),
        ("k", 1 << 20, "--mage-k"),
        ("k", 2.5, "--mage-k"),
        ("k", True, "--mage-k"),
        ("sink_tokens", -1, "--mage-sink-tokens"),
        ("local_window", -1, "--mage-local-window"),
        ("min_context", -1, "--mage-min-context"),
        ("selector", "lsh", "--mage-selector"),
        ("topk_method", "heap", "--mage-topk-method"),
        ("fused_pass", "three", "--mage-fused-pass"),
        ("pdl", "on", "--mage-pdl"),
        ("graph_first_step", "on", "--mage-graph-first-step"),
        ("overlap_selection", "yes", "--mage-overlap-selection"),
        ("overlap_selection", True, "--mage-overlap-selection"),  # with the default `mean` selector
        ("quest_page_size", 0, "--mage-quest-page-size"),
        ("vote_min_k", 0, "--mage-vote-min-k"),
        ("vote_min_k", 4096, "--mage-vote-min-k"),  # above vote_max_k
        ("sparse_commit", "yes", "--mage-sparse-commit"),
        ("force_sparse", 1, "--mage-force-sparse"),
    ],
)
def test_invalid_values_name_the_flag(field, value, flag):
    with pytest.raises(MageConfigError, match=flag):
        MageConfig(**{field: value})


def test_overlap_selection_needs_the_fused_two_pass_selector():
    assert MageConfig(selector="fused", fused_pass="two", overlap_selection=True).overlap_selection
    with pytest.raises(MageConfigError, match="--mage-overlap-selection: needs --mage-selector fused"):
        MageConfig(selector="fused", fused_pass="one", overlap_selection=True)
    parser = argparse.ArgumentParser()
    config.add_cli_args(parser)
    args = parser.parse_args(["--mage-selector", "fused", "--mage-overlap-selection"])
    assert config.resolve(config.values_from_namespace(args)).overlap_selection is True


def test_every_option_has_a_flag():
    import dataclasses

    parser = argparse.ArgumentParser()
    config.add_cli_args(parser)
    dests = {a.dest for a in parser._actions}
    assert [f.name for f in dataclasses.fields(MageConfig) if config.KWARG_PREFIX + f.name not in dests] == []
    args = parser.parse_args(["--mage-selector", "quest", "--mage-quest-page-size", "32"])
    assert config.resolve(config.values_from_namespace(args)).quest_page_size == 32


def test_unknown_option_is_rejected():
    with pytest.raises(MageConfigError, match="unknown MAGE option"):
        MageConfig.from_mapping({"topk": 3})


def test_cli_flags_parse_and_validate():
    parser = argparse.ArgumentParser()
    config.add_cli_args(parser)
    config.add_cli_args(parser)  # idempotent: no duplicate-flag error
    args = parser.parse_args(["--mage-k", "64", "--mage-selector", "vote", "--no-mage-sparse-commit", "--mage-force-sparse"])
    values = config.values_from_namespace(args)
    assert values == {"k": 64, "selector": "vote", "sparse_commit": False, "force_sparse": True}
    cfg = config.resolve(values)
    assert (cfg.k, cfg.selector, cfg.sparse_commit, cfg.force_sparse) == (64, "vote", False, True)
    assert config.values_from_namespace(parser.parse_args([])) == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["--mage-selector", "lsh"])


def test_engine_kwargs_are_popped():
    kwargs = {"model_path": "m", "mage_k": 128, "mage_min_context": 0}
    assert config.pop_engine_kwargs(kwargs) == {"k": 128, "min_context": 0}
    assert kwargs == {"model_path": "m"}


def test_environment_is_a_base_that_explicit_values_override(monkeypatch):
    monkeypatch.setenv(config.ENV_VAR, json.dumps({"k": 256, "selector": "vote"}))
    cfg = config.resolve({"k": 32})
    assert (cfg.k, cfg.selector) == (32, "vote")
    monkeypatch.setenv(config.ENV_VAR, "{not json")
    with pytest.raises(MageConfigError, match="not valid JSON"):
        config.resolve({})
    monkeypatch.setenv(config.ENV_VAR, "[1, 2]")
    with pytest.raises(MageConfigError, match="JSON object"):
        config.resolve({})


def test_json_round_trip():
    cfg = MageConfig(k=77, selector="vote", sparse_commit=False)
    assert MageConfig.from_mapping(json.loads(cfg.to_json())) == cfg
