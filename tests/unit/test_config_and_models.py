"""Typed configuration, the model catalog, the tiny model builder, and the deployment resolved from
them (catalog entries after overrides, engine arguments after the plan, placement, admission)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.catalog import load_catalog, resolve_source
from serving.admission import AdmissionSettings
from serving.config import ConfigError, load_config, parse_config, resolve

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
        (
            {"pools": [{"name": "a", "model": "tiny-llama", "admission": {"queue_deadline_s": 1}}]},
            ["pools.0.admission.queue_deadline_s", "1"],
        ),
        (
            {"pools": [{"name": "a", "model": "tiny-llama", "admission": {"kv_admit_fraction": 2}}]},
            ["pools.0.admission.kv_admit_fraction", "2"],
        ),
        (
            {
                "pools": [
                    {"name": "a", "model": "tiny-llama", "admission": {"max_num_seqs": 8, "ttft_slo_ms": 9}}
                ]
            },
            ["pools.a.admission", "`max_num_seqs` is set by `engine_args.max_num_seqs`", "`slo.ttft_ms`"],
        ),
        (  # keys removed in round 2: an old config fails naming what replaces them
            {"gateway": {"token_channel": False}, "pools": [{"name": "a", "model": "tiny-llama"}]},
            ["gateway", "`token_channel` was removed", "only data path"],
        ),
        (
            {"pools": [{"name": "a", "model": "tiny-llama", "max_ongoing_requests": 64}]},
            ["pools.0", "`max_ongoing_requests` was removed", "admission.max_queued_requests"],
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


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        ({"pools": [{"name": "a", "model": "gpt-9"}]}, ["pools.0.model", "gpt-9", "tiny-llama"]),
        (
            {"models": {"gpt-9": {"max_model_len": 64}}, "pools": [{"name": "a", "model": "tiny-llama"}]},
            ["models.gpt-9", "not in the catalog"],
        ),
        (
            {"catalog": "/nonexistent/catalog.yaml", "pools": [{"name": "a", "model": "tiny-llama"}]},
            ["catalog file not found", "/nonexistent/catalog.yaml"],
        ),
    ],
)
def test_catalog_errors_name_the_bad_value_at_resolution(raw: dict, fragments: list[str]) -> None:
    cfg = parse_config(raw)  # the file alone is valid: only the catalog knows the models
    with pytest.raises(ConfigError) as ei:
        resolve(cfg)
    for f in fragments:
        assert f in str(ei.value)


def test_gpu_pools_take_plan_settings_unless_explicit() -> None:
    d = resolve(
        parse_config(
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
                        "gpus_per_replica": 2,
                    },
                ]
            }
        )
    )
    planned, explicit = d.pools
    assert planned.plan is not None
    assert planned.engine_args["max_num_seqs"] == planned.plan.settings.max_num_seqs > 8
    assert planned.engine_args["dtype"] == "bfloat16"  # the catalog's per-GPU settings stay
    assert explicit.engine_args["max_num_seqs"] == 7 and explicit.engine_args["tensor_parallel_size"] == 2
    assert planned.ray_actor_options == {"num_cpus": 0.0, "num_gpus": 1, "accelerator_type": "H100"}
    assert planned.price_per_mtok > 0 and planned.weights_source == "meta-llama/Llama-3.1-8B-Instruct"


def test_placement_uses_custom_resource_for_types_ray_does_not_know() -> None:
    cfg = parse_config({"pools": [{"name": "l", "model": "qwen2.5-7b-instruct", "accelerator": "L20"}]})
    opts = resolve(cfg).pools[0].ray_actor_options
    assert opts["resources"] == {"accelerator_type:L20": 0.001} and "accelerator_type" not in opts


CLUSTER_POOLS = [
    {"name": "h100", "model": "llama-3.1-8b-instruct", "accelerator": "H100"},
    {"name": "sim-h100", "model": "llama-3.1-8b-instruct", "accelerator": "H100", "engine": "sim"},
    {"name": "sim-l20", "model": "llama-3.1-8b-instruct", "accelerator": "L20", "engine": "sim"},
    {"name": "cpu", "model": "tiny-llama", "accelerator": "CPU", "engine": "vllm"},
]


def _pins(options: dict) -> dict[str, float]:
    """The node resources a replica with these actor options needs (Ray's `accelerator_type`
    option is the resource `accelerator_type:<X>`)."""
    need = dict(options.get("resources", {}))
    if "accelerator_type" in options:
        need[f"accelerator_type:{options['accelerator_type']}"] = 0.001
    return need


def test_on_a_cluster_every_pool_is_pinned_to_its_type() -> None:
    """With ``ray.address`` set (or ``cluster=True``) simulated and CPU pools are pinned through
    ``accelerator_type:<X>`` too; on the local Ray only vLLM GPU pools are (nothing advertises it)."""
    on = resolve(parse_config({"ray": {"address": "auto"}, "pools": CLUSTER_POOLS}))
    local = resolve(parse_config({"pools": CLUSTER_POOLS}))
    forced = resolve(parse_config({"pools": CLUSTER_POOLS}), cluster=True)
    expected = {
        "h100": {"accelerator_type:H100": 0.001},
        "sim-h100": {"accelerator_type:H100": 0.001},
        "sim-l20": {"accelerator_type:L20": 0.001},
        "cpu": {"accelerator_type:CPU": 0.001},
    }
    assert {p.name: _pins(p.ray_actor_options) for p in on.pools} == expected
    assert {p.name: _pins(p.ray_actor_options) for p in forced.pools} == expected
    assert {p.name: _pins(p.ray_actor_options) for p in local.pools} == {
        "h100": {"accelerator_type:H100": 0.001},
        "sim-h100": {},
        "sim-l20": {},
        "cpu": {},
    }
    # Pinning asks for a sliver of the type's resource, never a GPU the simulated pool does not use.
    assert all("num_gpus" not in p.ray_actor_options for p in on.pools if p.engine == "sim")
    assert resolve(parse_config({"pools": CLUSTER_POOLS}), cluster=False).pools == local.pools


def test_model_overrides_apply() -> None:
    cfg = parse_config(
        {
            "models": {"llama-3.1-8b-instruct": {"tokenizer": "builtin:tiny-llama", "max_model_len": 4096}},
            "pools": [{"name": "s", "model": "llama-3.1-8b-instruct", "accelerator": "H20", "engine": "sim"}],
        }
    )
    d = resolve(cfg)
    entry = d.pools[0].entry
    assert entry.tokenizer == "builtin:tiny-llama" and entry.max_model_len == 4096
    assert d.models["llama-3.1-8b-instruct"].entry == entry
    # Resolved by each gateway on its own node: a path built here would mean nothing on another.
    assert d.models["llama-3.1-8b-instruct"].tokenizer_source == "builtin:tiny-llama"
    assert d.pools[0].weights_source == "" and d.pools[0].ray_actor_options == {"num_cpus": 0.0}


def test_unplannable_gpu_pool_is_a_config_error_unless_only_planning() -> None:
    cfg = parse_config(
        {
            "pools": [
                {
                    "name": "tight",
                    "model": "llama-3.1-8b-instruct",
                    "accelerator": "A10",
                    "slo": {"tpot_ms": 1},
                }
            ]
        }
    )
    with pytest.raises(ConfigError, match=r"pools\.tight: cannot plan"):
        resolve(cfg)
    pool = resolve(cfg, require_plans=False).pools[0]
    assert pool.plan is None and pool.plan_error and "TPOT" in pool.plan_error


def test_admission_settings_are_typed_and_become_the_core_config() -> None:
    cfg = parse_config(
        {
            "pools": [
                {
                    "name": "a",
                    "model": "tiny-llama",
                    "slo": {"ttft_ms": 1000, "tpot_ms": 50},
                    "admission": {"queue_deadline_ms": 250, "min_num_seqs": 2},
                }
            ]
        }
    )
    pool = resolve(cfg).pools[0]
    assert pool.admission == AdmissionSettings(queue_deadline_ms=250, min_num_seqs=2)
    core = pool.admission.for_engine(16, 4096, pool.slo.ttft_ms, pool.slo.tpot_ms)
    assert (core.max_num_seqs, core.min_num_seqs, core.queue_deadline_s, core.ttft_slo_ms) == (
        16,
        2,
        0.25,
        1000,
    )
    assert AdmissionSettings().queue_deadline_s_at(1000) == 0.6  # default: 60% of the TTFT target
    with pytest.raises(ValueError, match="min_num_seqs"):
        pool.admission.for_engine(1, 4096, 1000, 50)  # the engine's bound is checked when it is known


def test_replicas_get_the_admin_key_hash_never_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import pickle

    key = "tw-admin-" + "k" * 32
    monkeypatch.delenv("TOKENWEIR_ADMIN_KEY", raising=False)
    pools = [{"name": "a", "model": "tiny-llama"}]
    cfg = parse_config({"pools": pools, "metering": {"admin_key": key}})
    deployment = resolve(cfg)  # what every replica gets as its constructor argument
    assert deployment.metering.admin_key is None
    assert deployment.metering.admin_key_sha256 == hashlib.sha256(key.encode()).hexdigest()
    assert key.encode() not in pickle.dumps(deployment)
    assert key not in cfg.metering_config().for_actors().model_dump_json()  # the ledger actor's
    monkeypatch.setenv("TOKENWEIR_ADMIN_KEY", key)
    from_env = parse_config({"pools": pools}).metering_config().for_actors()
    assert from_env.admin_key is None and from_env.admin_key_sha256 == deployment.metering.admin_key_sha256
