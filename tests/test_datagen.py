import json

import pytest

from kefu_triage.data import validate_records
from kefu_triage.datagen import (
    PROTECTED,
    TEMPLATE_DIR,
    GeneratorError,
    _resources,
    add_noise,
    generate_splits,
    load_seeds,
)
from kefu_triage.taxonomy import load_taxonomy
from kefu_triage.textproc import clean_text

TAX = load_taxonomy()


@pytest.fixture(scope="module")
def generated():
    return generate_splits(seed=3, size=6000)


def test_same_seed_same_output_other_seed_differs(generated):
    again = generate_splits(seed=3, size=6000)
    assert all(generated[s] == again[s] for s in ("train", "dev", "test"))
    other = generate_splits(seed=4, size=6000)
    assert generated["train"] != other["train"]


def test_size_and_split_shares(generated):
    n = {s: len(generated[s]) for s in ("train", "dev", "test")}
    assert 0.9 * 6000 <= sum(n.values()) <= 6000
    assert sum(r["source"] == "template" for s in ("train", "dev", "test") for r in generated[s]) > 1000
    assert n["train"] > 3 * n["dev"] and n["dev"] > 0 and n["test"] > 0


def test_groups_and_texts_never_cross_splits(generated):
    groups = {s: {r["group_id"] for r in generated[s]} for s in ("train", "dev", "test")}
    assert not groups["train"] & groups["dev"] and not groups["train"] & groups["test"] and not groups["dev"] & groups["test"]
    train_texts = {clean_text(r["text"]) for r in generated["train"]}
    for split in ("dev", "test"):
        assert not train_texts & {clean_text(r["text"]) for r in generated[split]}


def test_every_intent_in_every_split_and_labels_valid(generated):
    for split in ("train", "dev", "test"):
        assert {r["intent"] for r in generated[split]} == set(TAX.intent_names), split
        rows = [(i, r, None) for i, r in enumerate(generated[split])]
        assert len(validate_records(rows, TAX, split)) == len(rows)  # raises on any invalid label
        refunds = [r["refund_recoverable"] for r in generated[split] if r["intent"] == "return_refund"]
        assert set(refunds) == {0, 1}, split


def test_intent_mix_is_long_tailed(generated):
    counts = {i: sum(r["intent"] == i for r in generated["train"]) for i in TAX.intent_names}
    assert counts["logistics"] + counts["shipping_time"] > 3 * counts["human_agent"]
    assert 0.08 < sum(r["urgent"] for r in generated["train"]) / len(generated["train"]) < 0.45


def test_noise_never_touches_label_characters():
    import random

    _, lexicon = _resources(str(TEMPLATE_DIR))
    rng = random.Random(0)
    for text in ("我要退货退款 投诉你们", "换个码 发票 保修", "快递到哪了 急急急"):
        for _ in range(200):
            noisy = add_noise(text, lexicon, rng, rate=1.0)
            assert [c for c in text if c in PROTECTED] == [c for c in noisy if c in PROTECTED], noisy


def test_seed_files_are_valid_and_unique():
    seeds = load_seeds()
    ids = [s["seed_id"] for s in seeds]
    assert len(ids) == len(set(ids))
    texts = [clean_text(s["text"]) for s in seeds]
    assert len(texts) == len(set(texts))
    validate_records([(i, s, None) for i, s in enumerate(seeds)], TAX, "seeds")


def test_broken_seed_file_names_file_and_line(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"seed_id": "a", "text": "hi"}) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(GeneratorError, match=r"x.jsonl:2: invalid JSON"):
        load_seeds(tmp_path)
