"""Typed configuration, the model catalog, the tiny model builder and pool planning."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.catalog import load_catalog, resolve_source
from serving.config import ConfigError, load_config, parse_config
from serving.pools.placement import ray_actor_options_for
from serving.pools.planning import deployed_entry, engine_args, plan_pool

REPO = Path(__file__).resolve().parents[2]


def test_shipped_configs_validate() -> None:
    local = load_config()
    assert local.gateway.port == 8000 and local.pools[0].model == "tiny-llama"
    fleet = load_config(REPO / "deploy" / "sim-fleet.yaml")
    assert {p.accelerator for p in fleet.pools} == {"H20", "H100", "L20", "A10"}


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        ({"pools": [{"name": "a", "model": "tiny-llama", "replicas": 0}]}, ["pools.0.replicas", "0"]),
        ({"pools": [{"name": "a", "model": "tiny-llama", "colour": "red"}]}, ["pools.0.colour", "red"]),
        ({"pools": [{"name": "a", "model": "gpt-9"}]}, ["pools.0.model", "gpt-9"]),
        (
            {"pools": [{"name": "a", "model": "tiny-llama", "accelerator": "TPU"}]},
            ["pools.0.accelerator", "TPU"],
        ),
        (
            {"pools": [{"name": "a", "model": "tiny-llama"}, {"name": "a", "model": "tiny-llama"}]},
            ["duplicate", "'a'"],
        ),
        ({"pools": []}, ["pools"]),
        (
            {"gateway": {"port": 70000}, "pools": [{"name": "a", "model": "tiny-llama"}]},
            ["gateway.port", "70000"],
        ),
        (
            {"pools": [{"name": "a", "model": "tiny-llama", "engine": "sim", "accelerator": "CPU"}]},
            ["sim", "CPU"],
        ),
    ],
)
def test_config_errors_name_field_and_value(raw: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(raw)
    for f in fragments:
        assert f in str(ei.value)


def test_missing_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_catalog_has_real_and_tiny_entries() -> None:
    cat = load_catalog()
    assert {"tiny-llama", "llama-3.1-8b-instruct", "qwen2.5-7b-instruct"} <= set(cat)
    llama = cat["llama-3.1-8b-instruct"]
    assert llama.arch.kv_heads == 8 and llama.arch.head_dim == 128 and llama.arch.dtype_bytes == 2
    assert llama.engine_args_for("A10")["max_model_len"] == 4096
    assert cat["tiny-llama"].arch.head_dim == 64


def test_tiny_model_is_content_addressed_and_byte_identical(tmp_path: Path) -> None:
    from models.tiny import build_tiny_model

    a = build_tiny_model(tmp_path / "a")
    b = build_tiny_model(tmp_path / "b")
    files = sorted(p.name for p in a.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    cached = resolve_source("builtin:tiny-llama")
    assert resolve_source("builtin:tiny-llama") == cached and "tiny-llama-" in cached
    with pytest.raises(ValueError):
        resolve_source("builtin:huge-llama")


def test_tiny_tokenizer_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_source("builtin:tiny-llama"))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_gpu_pools_take_plan_settings_unless_explicit() -> None:
    cfg = parse_config(
        {
            "pools": [
                {
                    "name": "h",
                    "model": "llama-3.1-8b-instruct",
                    "accelerator": "H100",
                    "slo": {"tpot_ms": 40},
                },
                {
                    "name": "e",
                    "model": "llama-3.1-8b-instruct",
                    "accelerator": "H100",
                    "engine_args": {"max_num_seqs": 7},
                },
            ]
        }
    )
    entry = load_catalog()["llama-3.1-8b-instruct"]
    planned = engine_args(cfg.pools[0], entry)
    plan = plan_pool(cfg.pools[0], entry)
    assert planned["max_num_seqs"] == plan.settings.max_num_seqs > 8
    assert engine_args(cfg.pools[1], entry)["max_num_seqs"] == 7
    assert ray_actor_options_for(cfg.pools[0]) == {"num_cpus": 0.0, "num_gpus": 1, "accelerator_type": "H100"}


def test_placement_uses_custom_resource_for_types_ray_does_not_know() -> None:
    cfg = parse_config({"pools": [{"name": "l", "model": "qwen2.5-7b-instruct", "accelerator": "L20"}]})
    opts = ray_actor_options_for(cfg.pools[0])
    assert opts["resources"] == {"accelerator_type:L20": 0.001} and "accelerator_type" not in opts


def test_model_overrides_apply() -> None:
    cfg = parse_config(
        {
            "models": {"llama-3.1-8b-instruct": {"tokenizer": "builtin:tiny-llama", "max_model_len": 4096}},
            "pools": [{"name": "s", "model": "llama-3.1-8b-instruct", "accelerator": "H20", "engine": "sim"}],
        }
    )
    entry = deployed_entry(load_catalog()["llama-3.1-8b-instruct"], cfg.models["llama-3.1-8b-instruct"])
    assert entry.tokenizer == "builtin:tiny-llama" and entry.max_model_len == 4096
