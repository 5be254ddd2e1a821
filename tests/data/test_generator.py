import json
import random
import shutil
from collections import Counter

import pytest

from kefu_triage.core.inputs import clean_text
from kefu_triage.core.taxonomy import load_taxonomy
from kefu_triage.data.generator import (
    DIALOGUE_FILE,
    DIALOGUE_SOURCES,
    MAX_PREVIOUS_TURNS,
    SPLITS,
    TEMPLATE_DIR,
    Dialogue,
    GeneratorError,
    add_noise,
    assign_unit,
    dialogue_context,
    generate_splits,
    group_splits,
    load_resources,
    load_seeds,
    normalise_text,
    protected_mask,
    split_of_group,
)
from kefu_triage.data.records import validate_examples, validate_records

TAX = load_taxonomy()


@pytest.fixture(scope="module")
def generated():
    return generate_splits(seed=3, size=4000)


# ---- a tiny, self-contained resource set (does not depend on how many seeds the package ships) -------------
MINI_LEXICON = {
    "mix": {"logistics": 5, "return_refund": 3, "human_agent": 1},
    "urgent_rate": {"default": 0.2},
    "slots": {"product": ["鞋子", "手机", "台灯"], "days": ["两", "三"]},
    "prefixes": ["亲"],
    "suffixes": ["谢谢"],
    "urgent_cues": ["气死了", "急急急", "问三遍了", "要投诉了"],
    "homophones": {"的": ["得"]},
    "traditional": {"这": "這"},
    "protected_terms": ["退", "人工"],
}
MINI_TEMPLATES = {
    "logistics": [
        {"id": f"l{i}", "u": i % 2, "t": [f"{{product}}到哪了{i}", f"物流{{days}}天没动{i}"]}
        for i in range(3)
    ],
    "return_refund": [
        {"id": f"r{i}", "u": 0, "r": i % 2, "t": [f"{{product}}想退{i}", f"退款{i}到了吗"]} for i in range(4)
    ],
    "human_agent": [{"id": f"h{i}", "u": 0, "t": [f"转人工{i}", f"人工{i}号"]} for i in range(3)],
}


def _write(tmp_path, templates=None, lexicon=None, seeds=None):
    tdir, sdir = tmp_path / "templates", tmp_path / "seed"
    tdir.mkdir()
    sdir.mkdir()
    (tdir / "lexicon.yaml").write_text(
        json.dumps(lexicon or MINI_LEXICON, ensure_ascii=False), encoding="utf-8"
    )
    (tdir / "mini.yaml").write_text(
        json.dumps(templates or MINI_TEMPLATES, ensure_ascii=False), encoding="utf-8"
    )
    if seeds is None:
        seeds = [
            {
                "seed_id": f"{intent}-{i:03d}",
                "text": f"{intent} 种子 {i}",
                "intent": intent,
                "urgent": i % 2,
                "refund_recoverable": (i % 2) if intent == "return_refund" else None,
            }
            for intent in MINI_LEXICON["mix"]
            for i in range(8)
        ]
    (sdir / "all.jsonl").write_text(
        "\n".join(json.dumps(s, ensure_ascii=False) for s in seeds) + "\n", encoding="utf-8"
    )
    return {"seed_dir": sdir, "template_dir": tdir}


# ---- determinism and size --------------------------------------------------------------------------------------
def test_same_seed_same_output_other_seed_differs(generated):
    assert generate_splits(seed=3, size=4000) == generated
    other = generate_splits(seed=4, size=4000)
    assert other["train"] != generated["train"]
    assert group_splits(seed=3) != group_splits(seed=4)


def test_fill_seed_draws_fresh_rows_from_the_same_groups(generated):
    assert generate_splits(seed=3, size=4000, fill_seed=3) == generated  # the default fill seed is the seed
    fresh = generate_splits(seed=3, size=4000, fill_seed=11)
    assignment = group_splits(seed=3)
    for split in SPLITS:
        assert {assignment[r["group_id"]] for r in fresh[split]} == {split}
    assert len({r["text"] for r in fresh["train"]} - {r["text"] for r in generated["train"]}) > 500


def test_size_is_exact_and_split_by_fraction(generated):
    n = {s: len(generated[s]) for s in SPLITS}
    assert sum(n.values()) == 4000
    assert n == {"train": 2800, "dev": 600, "test": 600}
    assert len({r["id"] for s in SPLITS for r in generated[s]}) == 4000


def test_small_size_subsamples_seeds_and_says_so():
    data = generate_splits(seed=1, size=600)
    assert sum(len(data[s]) for s in SPLITS) == 600
    assert sum(data["stats"]["seeds_left_out_for_size"].values()) > 0  # never silently
    assert all(r["source"] != "seed_variant" for r in data["train"])
    for split in SPLITS:  # templates still present: the mix and the cues come from them
        assert sum(r["source"] == "template" for r in data[split]) >= 0.3 * len(data[split])


# ---- generalisation: groups and texts never cross splits -----------------------------------------------------------
def test_groups_never_cross_splits_and_match_split_of_group(generated):
    groups = {s: {r["group_id"] for r in generated[s]} for s in SPLITS}
    assert not groups["train"] & groups["dev"]
    assert not groups["train"] & groups["test"]
    assert not groups["dev"] & groups["test"]
    assignment = group_splits(seed=3)
    for split in SPLITS:
        assert {assignment[g] for g in groups[split]} == {split}
    some = sorted(groups["test"])[0]
    assert split_of_group(some, seed=3) == "test"
    with pytest.raises(GeneratorError, match="unknown group"):
        split_of_group("tpl:logistics:no-such-template", seed=3)


def test_no_exact_or_normalised_text_leaks_into_later_splits(generated):
    lex = load_resources().lexicon
    seen_clean, seen_norm = set(), set()
    for split in SPLITS:
        clean = {clean_text(r["text"]) for r in generated[split]}
        norm = {normalise_text(r["text"], lex) for r in generated[split]}
        assert not clean & seen_clean, split
        assert not norm & seen_norm, split
        seen_clean |= clean
        seen_norm |= norm
    assert normalise_text("這個 到哪了？？", lex) == normalise_text("这个到哪了", lex)


def test_colliding_seed_texts_are_dropped_from_later_splits_with_a_count(tmp_path):
    seeds = [
        {
            "seed_id": f"greeting-{i:03d}",
            "text": "在吗",
            "intent": "human_agent",
            "urgent": 0,
            "refund_recoverable": None,
        }
        for i in range(12)
    ]
    seeds += [
        {
            "seed_id": f"x-{i:03d}",
            "text": f"快递{i}到哪了",
            "intent": "logistics",
            "urgent": 0,
            "refund_recoverable": None,
        }
        for i in range(12)
    ]
    paths = _write(tmp_path, seeds=seeds)
    data = generate_splits(seed=0, size=400, **paths)
    where = group_splits(seed=0, **paths)
    split_count = Counter(where[f"seed:greeting-{i:03d}"] for i in range(12))
    kept = [r for s in SPLITS for r in data[s] if r["text"] == "在吗" and r["source"] == "seed"]
    assert len(kept) == 1 and kept[0]["group_id"] in {g for g, s in where.items() if s == "train"}
    stats = data["stats"]
    assert stats["dropped_duplicates"]["train"] == split_count["train"] - 1
    assert stats["dropped_leaked"]["dev"] + stats["dropped_duplicates"]["dev"] == split_count["dev"]
    assert stats["dropped_leaked"]["test"] + stats["dropped_duplicates"]["test"] == split_count["test"]


# ---- labels and coverage ------------------------------------------------------------------------------------------
def test_every_intent_in_every_split_with_seeds_and_templates(generated):
    for split in SPLITS:
        rows = generated[split]
        assert {r["intent"] for r in rows} == set(TAX.intent_names), split
        for source in ("seed", "template"):
            assert {r["intent"] for r in rows if r["source"] == source} == set(TAX.intent_names), (
                split,
                source,
            )


def test_labels_valid_against_the_packaged_taxonomy(generated):
    refund_intents = set(TAX.refund_intents)
    for split in SPLITS:
        for r in generated[split]:
            assert r["intent"] in TAX.intent_names and r["urgent"] in (0, 1)
            if r["intent"] in refund_intents:
                assert r["refund_recoverable"] in (0, 1), r
            else:
                assert r["refund_recoverable"] is None, r
            assert all(t["role"] in ("customer", "agent") and t["text"] for t in r["context"])
            assert r["text"].strip() and r["source"] in (
                "seed",
                "seed_variant",
                "template",
                *DIALOGUE_SOURCES,
            )
        rows = [(i + 1, r, None) for i, r in enumerate(generated[split])]
        assert len(validate_records(rows, TAX, split)) == len(rows)  # the data contract's own validator
        refunds = Counter(r["refund_recoverable"] for r in generated[split] if r["intent"] in refund_intents)
        assert min(refunds[0], refunds[1]) >= 0.3 * sum(refunds.values()), (split, refunds)


def test_intent_mix_is_long_tailed_and_urgent_rate_realistic(generated):
    for split in SPLITS:
        counts = Counter(r["intent"] for r in generated[split])
        assert counts["logistics"] + counts["shipping_time"] > 3 * counts["human_agent"], split
        assert counts.most_common(1)[0][0] == "logistics", split
        rate = sum(r["urgent"] for r in generated[split]) / len(generated[split])
        assert 0.12 <= rate <= 0.3, (split, rate)


def test_resources_have_many_templates_per_intent():
    res = load_resources()
    per_intent = Counter(t.intent for t in res.templates)
    assert set(per_intent) == set(TAX.intent_names)
    assert min(per_intent.values()) >= 15
    assert per_intent["logistics"] >= 25 and per_intent["return_refund"] >= 25
    recoverable = Counter(t.refund for t in res.templates if t.intent == "return_refund")
    assert recoverable[0] >= 10 and recoverable[1] >= 10


# ---- noise never changes the label ---------------------------------------------------------------------------------
def test_noise_keeps_protected_terms_and_placeholders():
    res = load_resources()
    lex, rng = res.lexicon, random.Random(0)
    terms = lex["protected_terms"]
    texts = [p for t in res.templates for p in t.patterns if any(term in p for term in terms) or "[" in p]
    assert len(texts) > 200
    changed = 0
    for text in texts:
        for _ in range(5):
            noisy = add_noise(text, lex, rng, rate=1.0, urgent=True)
            changed += noisy != text
            for term in terms:
                assert noisy.count(term) >= text.count(term), (term, text, noisy)
            for placeholder in ("[订单x]", "[金额x]", "[数字x]", "[地址x]", "[表情]", "[链接x]"):
                assert noisy.count(placeholder) >= text.count(placeholder), (text, noisy)
    assert changed > 0.6 * 5 * len(texts)  # the noise does act (some ops find nothing to change)


def test_generated_rows_keep_the_words_their_template_is_built_on(generated):
    res = load_resources()
    always = {
        t.group_id: [w for w in ("退", "换", "投诉", "人工", "发票") if all(w in p for p in t.patterns)]
        for t in res.templates
    }
    checked = 0
    for split in SPLITS:
        for r in generated[split]:
            for word in always.get(r["group_id"], []):
                assert word in r["text"], (word, r)
                checked += 1
    assert checked > 150


def test_protected_mask_covers_terms_and_placeholders():
    mask = protected_mask("我要退货 [订单x] 好的", ["退"])
    assert mask[2] and not mask[3]
    assert all(mask[5:10]) and not mask[4] and not mask[10]


def test_calm_rows_get_no_angry_punctuation():
    lex, rng = load_resources().lexicon, random.Random(1)
    for _ in range(300):
        assert "!!!" not in add_noise("什么时候发货", lex, rng, rate=1.0, urgent=False)


# ---- small resources: stratification still evaluates every intent ------------------------------------------------
def test_few_templates_per_intent_still_reach_dev_and_test(tmp_path):
    paths = _write(tmp_path)
    data = generate_splits(seed=5, size=500, **paths)
    assert sum(len(data[s]) for s in SPLITS) == 500
    for split in SPLITS:
        for source in ("seed", "template"):
            intents = {r["intent"] for r in data[split] if r["source"] == source}
            assert intents == set(MINI_LEXICON["mix"]), (split, source)
    refund_dev = {
        r["refund_recoverable"] for s in ("dev", "test") for r in data[s] if r["intent"] == "return_refund"
    }
    assert refund_dev == {0, 1}


def test_assign_unit_stratifies_and_respects_fractions():
    strata = {("firm",): [f"f{i}" for i in range(50)], ("recoverable",): [f"r{i}" for i in range(50)]}
    out = assign_unit(strata, random.Random(0), 0.2, 0.1)
    counts = Counter(out.values())
    assert counts == {"train": 70, "dev": 20, "test": 10}
    for prefix in "fr":
        per = Counter(s for g, s in out.items() if g.startswith(prefix))
        assert 8 <= per["dev"] <= 12 and 3 <= per["test"] <= 7
    three = assign_unit({0: ["a", "b", "c"]}, random.Random(0), 0.15, 0.15)
    assert sorted(three.values()) == ["dev", "test", "train"]


# ---- dialogue snippets: context decides the intent (or, for topic switches, does not) -----------------------------
def _dialogue_rows(data, split, source="dialogue"):
    return [r for r in data[split] if r["source"] == source]


def test_dialogue_rows_have_one_to_max_previous_turns_and_valid_labels(generated):
    res = load_resources()
    families = {d.group_id: d for d in res.dialogues}
    for split in SPLITS:
        rows = _dialogue_rows(generated, split)
        assert rows, split
        assert len(validate_examples(rows, TAX, f"dialogue {split}")) == len(rows)
        for r in rows:
            assert 1 <= len(r["context"]) <= MAX_PREVIOUS_TURNS, r
            assert all(t["role"] in ("customer", "agent") and t["text"].strip() for t in r["context"]), r
            family = families[r["group_id"]]  # a dialogue family's group, with the family's labels
            assert (r["intent"], r["urgent"], r["refund_recoverable"]) == (
                family.intent,
                family.urgent,
                family.refund,
            )
        switches = _dialogue_rows(generated, split, "dialogue_switch")
        assert switches, split
        templates = {t.group_id: t for t in res.templates}
        for r in switches:  # a message that stands alone: a template without fixed previous turns
            assert 1 <= len(r["context"]) <= MAX_PREVIOUS_TURNS and r["group_id"] in templates, r
            assert not templates[r["group_id"]].context and templates[r["group_id"]].intent == r["intent"]
        # many intents: the model cannot learn "has context -> one intent"
        assert len({r["intent"] for r in rows}) >= 10, split
        assert len({len(r["context"]) for r in rows}) == MAX_PREVIOUS_TURNS, split


def test_dialogue_families_never_cross_splits(generated, tmp_path):
    assignment = group_splits(seed=3)
    groups = {s: {r["group_id"] for r in _dialogue_rows(generated, s)} for s in SPLITS}
    assert all(g.startswith("dlg:") for s in SPLITS for g in groups[s])
    assert not groups["train"] & groups["dev"] and not groups["train"] & groups["test"]
    assert not groups["dev"] & groups["test"]
    for split in SPLITS:
        assert {assignment[g] for g in groups[split]} == {split}
        assert generated["stats"]["dialogue_groups"][split] == len(groups[split])
    dlg = [g for g in assignment if g.startswith("dlg:")]
    assert split_of_group(sorted(dlg)[0], seed=3) == assignment[sorted(dlg)[0]]
    # families get their own stream: seed and template groups are assigned as without dialogues
    shutil.copytree(TEMPLATE_DIR, tmp_path / "t", ignore=shutil.ignore_patterns(DIALOGUE_FILE))
    without = group_splits(seed=3, template_dir=tmp_path / "t")
    assert not any(g.startswith("dlg:") for g in without)
    assert {g: s for g, s in assignment.items() if not g.startswith("dlg:")} == without


def test_dialogue_share_is_respected_and_reported():
    for share in (0.0, 0.3):
        data = generate_splits(seed=2, size=2000, dialogue_share=share)
        stats = data["stats"]
        for split in SPLITS:
            n = len(data[split])
            dialogue = len(_dialogue_rows(data, split)) + len(_dialogue_rows(data, split, "dialogue_switch"))
            assert dialogue == round(share * n), (share, split)
            assert stats["dialogue_rows"][split] == len(_dialogue_rows(data, split))
            assert stats["dialogue_switch_rows"][split] == len(_dialogue_rows(data, split, "dialogue_switch"))
            assert stats["shortfall"][split] == 0
    with pytest.raises(GeneratorError, match="dialogue_share"):
        generate_splits(seed=0, size=100, dialogue_share=1.0)


def test_dialogue_generation_is_deterministic_and_seed_dependent(generated):
    again = generate_splits(seed=3, size=4000)
    assert _dialogue_rows(again, "train") == _dialogue_rows(generated, "train")
    other = generate_splits(seed=4, size=4000)
    assert _dialogue_rows(other, "train") != _dialogue_rows(generated, "train")


@pytest.mark.parametrize("lead", ["agent", "customer"])
def test_dialogue_context_keeps_the_deciding_turn_within_n_turns(lead):
    settings = load_resources().dialogue_settings
    family = Dialogue(
        "product_inquiry", "x", 0, None, lead, ("这款还有货吗",), ("亲 您要什么颜色呢",), ("米白的呢",)
    )
    rng = random.Random(0)
    for n in range(1, MAX_PREVIOUS_TURNS + 1):
        for _ in range(40):
            turns = dialogue_context(family, settings, rng, n)
            assert 1 <= len(turns) <= n
            deciding = (
                {"role": "agent", "text": "亲 您要什么颜色呢"}
                if lead == "agent"
                else {"role": "customer", "text": "这款还有货吗"}
            )
            assert deciding in turns, (n, turns)
            if lead == "agent" and n == 1:
                assert turns == [deciding]


def test_topic_threads_put_same_topic_follow_ups_between_the_deciding_turn_and_the_current_turn():
    settings = {**load_resources().dialogue_settings, "thread_share": 1.0}
    family = Dialogue(
        "return_refund", "x", 0, 1, "customer", ("我想退货",), ("亲 可以的哦",), ("运费谁出", "几天到账")
    )
    rng = random.Random(0)
    for _ in range(40):
        turns = dialogue_context(family, settings, rng, 6)
        opener = turns.index({"role": "customer", "text": "我想退货"})
        after = [t["text"] for t in turns[opener + 1 :] if t["role"] == "customer"]
        # the customer's own follow-ups in the same topic come after the deciding opener
        assert after and set(after) <= {"运费谁出", "几天到账"}, turns
    # without threads the opener's topic is never followed up before the current turn
    settings["thread_share"] = 0.0
    for _ in range(40):
        turns = dialogue_context(family, settings, rng, 6)
        assert not [t for t in turns if t["text"] in ("运费谁出", "几天到账")], turns


MINI_DIALOGUES = {
    "fillers": {
        "agent_hello": ["您好"],
        "customer_hello": ["在吗"],
        "agent_wait": ["亲 稍等"],
        "customer_ack": ["好的"],
        "agent_ack": ["好的呢"],
        "cards": ["[链接x]"],
    },
    "families": {
        "logistics": [
            {
                "id": f"d{i}",
                "u": 0,
                "lead": "agent",
                "c": [f"快递呢{i}"],
                "a": [f"亲 订单号是多少{i}"],
                "t": [f"[订单x] 第{i}单"],
            }
            for i in range(3)
        ]
    },
}


@pytest.mark.parametrize(
    "bad, match",
    [
        (
            {"families": {"logistics": [{"id": "d", "u": 0, "lead": "nobody", "a": ["x"], "t": ["y"]}]}},
            r"lead must be",
        ),
        (
            {"families": {"logistics": [{"id": "d", "u": 0, "lead": "customer", "a": ["x"], "t": ["y"]}]}},
            r"lead must be",
        ),
        (
            {
                "families": {
                    "logistics": [{"id": "d", "u": 0, "r": 1, "lead": "agent", "a": ["x"], "t": ["y"]}]
                }
            },
            r"dialogues.yaml: logistics\[0\] \(id d\): r",
        ),
        (
            {"families": {"logistics": [{"id": "d", "u": 0, "lead": "agent", "a": ["{nope}"], "t": ["y"]}]}},
            r"unknown slot \{nope\}",
        ),
        (
            {"families": {"logistics": [{"id": "d", "u": 0, "lead": "agent", "a": ["x"], "t": []}]}},
            r"t: must be",
        ),
        ({"fillers": {"agent_hello": ["您好"]}}, r"fillers.customer_hello"),
        ({"slots": {"product": ["x"]}}, r"already defined"),
    ],
)
def test_broken_dialogues_name_file_and_entry(tmp_path, bad, match):
    paths = _write(tmp_path)
    (paths["template_dir"] / "dialogues.yaml").write_text(
        json.dumps({**MINI_DIALOGUES, **bad}, ensure_ascii=False), encoding="utf-8"
    )
    with pytest.raises(GeneratorError, match=match):
        generate_splits(seed=0, size=100, **paths)


def test_small_dialogue_resources_reach_every_split(tmp_path):
    paths = _write(tmp_path)
    (paths["template_dir"] / "dialogues.yaml").write_text(
        json.dumps(MINI_DIALOGUES, ensure_ascii=False), encoding="utf-8"
    )
    data = generate_splits(seed=1, size=500, dialogue_share=0.2, **paths)
    for split in SPLITS:
        rows = _dialogue_rows(data, split)
        assert rows and {r["intent"] for r in rows} == {"logistics"}, split
        assert len({r["group_id"] for r in rows}) == 1  # three families: one per split
    (tmp_path / "plain").mkdir()
    no_dialogues = generate_splits(seed=1, size=500, **_write(tmp_path / "plain"))
    assert not any(r["source"] in DIALOGUE_SOURCES for s in SPLITS for r in no_dialogues[s])


# ---- bad resources fail clearly ----------------------------------------------------------------------------------
def test_broken_seed_file_names_file_and_line(tmp_path):
    (tmp_path / "x.jsonl").write_text(
        json.dumps({"seed_id": "a", "text": "hi"}) + "\n{oops\n", encoding="utf-8"
    )
    with pytest.raises(GeneratorError, match=r"x.jsonl:2: invalid JSON"):
        load_seeds(tmp_path)


def test_invalid_seed_labels_are_listed_with_file_and_line(tmp_path):
    rows = [
        {"seed_id": "a", "text": "退钱", "intent": "return_refund", "urgent": 0, "refund_recoverable": None},
        {"seed_id": "b", "text": "在吗", "intent": "greeting", "urgent": 2, "refund_recoverable": 1},
        {"seed_id": "a", "text": "hi", "intent": "nope", "urgent": 0, "refund_recoverable": None},
    ]
    (tmp_path / "s.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8"
    )
    with pytest.raises(GeneratorError) as err:
        load_seeds(tmp_path, TAX)
    msg = str(err.value)
    assert "s.jsonl:1: refund_recoverable" in msg and "s.jsonl:2: urgent" in msg
    assert "s.jsonl:2: refund_recoverable: must be null" in msg
    assert "s.jsonl:3: intent" in msg and "already used at s.jsonl:1" in msg


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"greeting": [{"id": "g", "u": 0, "r": 1, "t": ["你好"]}]}, r"mini.yaml: greeting\[0\] \(id g\): r"),
        ({"return_refund": [{"id": "x", "u": 0, "t": ["退"]}]}, r"must be 0 or 1 for return_refund"),
        ({"logistics": [{"id": "x", "u": 0, "t": ["{nope}到哪了"]}]}, r"unknown slot \{nope\}"),
        ({"logistics": [{"id": "x", "u": 3, "t": ["到哪了"]}]}, r"u \(urgent\) must be 0 or 1"),
        ({"logistics": [{"id": "x", "u": 0, "t": ["a"], "urgent": 1}]}, r"unknown key\(s\) \['urgent'\]"),
        ({"no_such_intent": [{"id": "x", "u": 0, "t": ["a"]}]}, r"'no_such_intent' is not in the taxonomy"),
        ({"logistics": [{"id": "x", "u": 0, "t": ["a"]}, {"id": "x", "u": 0, "t": ["b"]}]}, r"already used"),
    ],
)
def test_broken_templates_name_file_and_template(tmp_path, bad, match):
    paths = _write(tmp_path, templates=bad)
    with pytest.raises(GeneratorError, match=match):
        generate_splits(seed=0, size=100, **paths)


def test_handoff_openings_come_right_before_messages_of_every_kind(generated):
    # a "转人工" (or the platform's notice of it) right before the message must not teach human_agent
    handoffs = set(load_resources().lexicon["handoff_turns"])
    rows = [
        r
        for split in SPLITS
        for r in generated[split]
        if r.get("context") and r["context"][0]["text"] in handoffs and r["source"] not in DIALOGUE_SOURCES
    ]
    assert len(rows) > 40
    assert all(r["context"][0]["role"] == "customer" and len(r["context"]) <= 2 for r in rows)
    assert any(len(r["context"]) == 1 for r in rows)  # the notice directly before the message
    intents = Counter(r["intent"] for r in rows)
    assert len(intents) >= 12 and intents["human_agent"] < 0.2 * len(rows), intents


@pytest.mark.parametrize("share", [1.5, "half", True])
def test_bad_handoff_share_is_named(tmp_path, share):
    paths = _write(tmp_path, lexicon={**MINI_LEXICON, "handoff_share": share})
    with pytest.raises(GeneratorError, match="lexicon.yaml: handoff_share must be a number"):
        generate_splits(seed=0, size=100, **paths)


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(GeneratorError, match="size"):
        generate_splits(seed=0, size=0)
    with pytest.raises(GeneratorError, match="dev_fraction"):
        generate_splits(seed=0, size=100, dev_fraction=0.6, test_fraction=0.5)
    paths = _write(tmp_path, lexicon={**MINI_LEXICON, "mix": {"logistics": 1}})
    with pytest.raises(GeneratorError, match="mix has no weight"):
        generate_splits(seed=0, size=100, **paths)
