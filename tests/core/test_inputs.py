import pytest

from kefu_triage.core.inputs import MAX_MESSAGE_CHARS, InputError, build_input, clean_text, format_context


def test_clean_text_drops_control_chars_and_collapses_space():
    assert clean_text("快递\x00到哪了\u200b \t\n 亲") == "快递到哪了 亲"


def test_clean_text_keeps_emoji_sequences():
    # the zero-width joiner inside a family emoji must survive
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    assert clean_text(f"谢谢{family}") == f"谢谢{family}"


def test_clean_text_truncates_long_input():
    assert len(clean_text("急" * 100_000)) == MAX_MESSAGE_CHARS


def test_build_input_with_context_keeps_last_turns_oldest_first():
    ctx = [
        {"role": "customer", "text": "在吗"},
        {"role": "agent", "text": "您好，请问有什么可以帮您"},
        {"role": "customer", "text": "地址写错了"},
        {"role": "agent", "text": "请提供新地址"},
    ]
    first, second = build_input("[地址x]", ctx, context_turns=2)
    assert first == "[地址x]"
    assert second == "顾客：地址写错了 客服：请提供新地址"


def test_build_input_without_context_turns_ignores_context():
    assert build_input("你好", [{"role": "agent", "text": "x"}], context_turns=0) == ("你好", None)


@pytest.mark.parametrize("bad", [None, 3, ["a"], b"bytes"])
def test_build_input_rejects_non_string(bad):
    with pytest.raises(InputError, match="text must be a string"):
        build_input(bad)


@pytest.mark.parametrize(
    "ctx,match",
    [
        ("not a list", "context must be a list"),
        ([{"role": "boss", "text": "x"}], "role must be"),
        ([{"role": "agent", "text": 5}], "text must be a string"),
        (["x"], "must be a dict"),
    ],
)
def test_format_context_errors_name_the_turn(ctx, match):
    with pytest.raises(InputError, match=match):
        format_context(ctx, 2)
