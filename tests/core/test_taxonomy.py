import json

import pytest

from kefu_triage.core.taxonomy import (
    DEFAULT_TAXONOMY_PATH,
    Taxonomy,
    TaxonomyError,
    load_taxonomy,
    taxonomy_from_config,
)


def test_packaged_contract_matches_the_label_spec():
    t = load_taxonomy()
    assert t.num_intents == 17
    assert t.intent_names[0] == "greeting" and t.intent_names[-1] == "other"
    assert t.refund_intents == ["return_refund"]
    assert t.route_of("complaint") == "human" and t.route_of("logistics") == "bot"
    assert set(t.heads) == {"intent", "urgent", "refund_recoverable"}


def test_to_dict_round_trip_keeps_class_order_even_through_sorted_json():
    t = load_taxonomy()
    again = Taxonomy.from_dict(json.loads(json.dumps(t.to_dict(), sort_keys=True)))
    assert again.intent_names == t.intent_names and again.routes == t.routes


def test_unknown_intent_error_lists_known_ones():
    with pytest.raises(TaxonomyError, match="unknown intent 'refund'.*return_refund"):
        load_taxonomy().intent_id("refund")


@pytest.mark.parametrize(
    "content,match",
    [
        ("- just a list", "must be a mapping"),
        ("intents: {}", "non-empty mapping"),
        ("intents: {a: {route: bot}, b: {route: robot}}", "intents.b.route is 'robot'"),
        ("intents: {a: {zh: x}, b: {route: bot}}", "intents.a needs a 'route'"),
        ("intents: {a: {route: bot}}", "at least two intents"),
        ("intents: [unclosed", "invalid YAML"),
    ],
)
def test_bad_taxonomy_files_name_the_file_and_field(tmp_path, content, match):
    path = tmp_path / "tax.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TaxonomyError, match=match) as err:
        load_taxonomy(path)
    assert "tax.yaml" in str(err.value)


def test_missing_taxonomy_file(tmp_path):
    with pytest.raises(TaxonomyError, match="not found"):
        load_taxonomy(tmp_path / "nope.yaml")


def test_user_taxonomy_via_config_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("intents: {ask: {route: bot}, angry: {route: human}, refund: {route: refund_triage}}")
    t = taxonomy_from_config({"path": str(path)})
    assert t.intent_names == ["ask", "angry", "refund"] and t.refund_intents == ["refund"]
    assert (
        taxonomy_from_config({"intents": {"x": {"route": "bot"}, "y": {"route": "human"}}}).num_intents == 2
    )
    assert DEFAULT_TAXONOMY_PATH.is_file()


def test_json_taxonomy_and_bad_heads(tmp_path):
    good = tmp_path / "t.json"
    good.write_text(
        json.dumps({"intents": {"a": {"route": "bot"}, "b": {"route": "refund_triage"}}}), encoding="utf-8"
    )
    assert load_taxonomy(good).refund_intents == ["b"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"intents": {"a": {"route": "bot"}, "b": {"route": "human"}}, "heads": [1]}))
    with pytest.raises(TaxonomyError, match=r"bad.json: 'heads' must be a mapping"):
        load_taxonomy(bad)
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    with pytest.raises(TaxonomyError, match=r"broken.json: invalid JSON"):
        load_taxonomy(tmp_path / "broken.json")
