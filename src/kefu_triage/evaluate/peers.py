"""Peers evaluated beside the model with the same policy: character n-gram TF-IDF + logistic regression
(trained on the same train split) and a keyword-rule baseline. Both return logits in the model's format
(``intent_logits`` [N, K] as log-probabilities, binary logits as log-odds) so calibration, tuning and
reports treat every scorer alike."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from kefu_triage.core.inputs import build_input


def _texts(records: list[dict[str, Any]], context_turns: int) -> list[str]:
    out = []
    for r in records:
        first, second = build_input(r["text"], r.get("context"), context_turns)
        out.append(first if second is None else f"{first} || {second}")
    return out


def _log_odds(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


class TfidfLogRegBaseline:
    """Char 1-3-gram TF-IDF + (class-balanced) logistic regression per head."""

    name = "tfidf_lr"

    def __init__(self, num_intents: int, context_turns: int = 0, C: float = 5.0, seed: int = 0):
        self.num_intents, self.context_turns, self.C, self.seed = num_intents, context_turns, C, seed

    def _pipe(self):
        return make_pipeline(
            TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), min_df=1, sublinear_tf=True),
            LogisticRegression(C=self.C, max_iter=2000, class_weight="balanced", random_state=self.seed),
        )

    def fit(self, records: list[dict[str, Any]], taxonomy) -> TfidfLogRegBaseline:
        x = _texts(records, self.context_turns)
        self.intent = self._pipe().fit(x, [taxonomy.intent_id(r["intent"]) for r in records])
        # partial labels: each binary head learns from the rows that carry its label
        urgent = [
            (t, int(r["urgent"])) for t, r in zip(x, records, strict=True) if r.get("urgent") is not None
        ]
        self.urgent = (
            self._pipe().fit(*zip(*urgent, strict=True)) if len({y for _, y in urgent}) == 2 else None
        )
        refund = [
            (t, r["refund_recoverable"])
            for t, r in zip(x, records, strict=True)
            if r.get("refund_recoverable") is not None
        ]
        self.refund = (
            self._pipe().fit(*zip(*refund, strict=True)) if len({y for _, y in refund}) == 2 else None
        )
        return self

    def predict_logits(self, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        x = _texts(records, self.context_turns)
        probs = np.full((len(x), self.num_intents), 1e-6)
        probs[:, self.intent.classes_] = self.intent.predict_proba(x)
        urgent = self.urgent.predict_proba(x)[:, 1] if self.urgent is not None else np.full(len(x), 0.5)
        refund = self.refund.predict_proba(x)[:, 1] if self.refund is not None else np.full(len(x), 0.5)
        return {
            "intent_logits": np.log(probs / probs.sum(1, keepdims=True)),
            "urgent_logit": _log_odds(urgent),
            "refund_recoverable_logit": _log_odds(refund),
        }


# Keyword lists: what a team writes on day one without a model. Order matters: earlier intents win ties.
INTENT_KEYWORDS: dict[str, tuple[str, ...]] = {
    "human_agent": ("人工", "真人", "机器人", "转人", "主管", "经理", "客服电话"),
    "complaint": ("投诉", "态度", "12315", "消协", "曝光", "差评", "赔偿", "说法", "欺诈", "虚假"),
    "quality_issue": (
        "坏的",
        "破",
        "碎",
        "裂",
        "少发",
        "漏发",
        "发错",
        "错发",
        "少了",
        "假货",
        "过期",
        "污渍",
        "瑕疵",
        "有洞",
    ),
    "exchange": ("换货", "换个", "换成", "换一", "换码", "换大", "换小", "换颜色"),
    "return_refund": ("退货", "退款", "退钱", "退了", "退回", "想退", "要退", "无理由"),
    "cancel_order": ("取消", "拒收", "不要了", "退单", "拦截"),
    "price_protection": ("价保", "补差", "差价", "降价", "保价"),
    "invoice": ("发票", "抬头", "税号", "专票"),
    "address_change": ("地址", "改电话", "手机号", "收件人", "收货人", "改成", "送货时间"),
    "repair_warranty": ("保修", "维修", "报修", "安装", "师傅", "质保", "售后", "修"),
    "payment": ("付款", "支付", "分期", "白条", "花呗", "信用卡", "扣款", "拍了", "已付", "拍下"),
    "promotion": ("优惠", "券", "满减", "赠品", "活动", "包邮", "运费", "便宜", "打折", "京豆", "积分"),
    "logistics": ("快递", "物流", "到哪", "签收", "派送", "驿站", "配送", "送到", "没收到", "运单", "到了吗"),
    "shipping_time": ("发货", "发出", "几天发", "什么时候发", "出库", "打包"),
    "product_inquiry": ("有货", "尺码", "什么码", "材质", "区别", "正品", "多大", "码", "适合", "怎么用"),
    "greeting": ("在吗", "你好", "谢谢", "好的", "收到", "嗯嗯", "ok", "hello", "您好"),
}
URGENT_KEYWORDS = (
    "投诉",
    "差评",
    "12315",
    "曝光",
    "报警",
    "消协",
    "急",
    "气死",
    "！！",
    "!!",
    "？？",
    "??",
    "马上",
    "立刻",
    "必须",
    "第三次",
    "几次了",
    "没人",
    "骗",
    "破",
    "太差",
    "垃圾",
    "结婚",
    "婚礼",
    "考试",
    "明天就要",
)
RECOVERABLE_KEYWORDS = (
    "小",
    "大了",
    "尺码",
    "颜色",
    "色差",
    "线头",
    "划痕",
    "要不",
    "算了",
    "不会用",
    "装不上",
    "降价",
    "便宜",
    "不小心",
    "点错",
    "误点",
    "补偿",
    "换",
    "纠结",
    "后悔",
)


class KeywordRuleBaseline:
    """Keyword matching: the first listed intent with a hit wins; cue words make a message urgent."""

    name = "keyword_rules"

    def __init__(self, intent_names: list[str]):
        self.intent_names = list(intent_names)
        fallback = "other" if "other" in self.intent_names else self.intent_names[-1]
        self.fallback = self.intent_names.index(fallback)

    def fit(self, records: list[dict[str, Any]], taxonomy) -> KeywordRuleBaseline:
        return self

    def predict_logits(self, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        n, k = len(records), len(self.intent_names)
        probs = np.full((n, k), 0.3 / max(k - 1, 1))
        urgent, refund = np.full(n, 0.1), np.full(n, 0.3)
        for i, r in enumerate(records):
            text = r["text"].lower()
            hit = next(
                (
                    self.intent_names.index(name)
                    for name, words in INTENT_KEYWORDS.items()
                    if name in self.intent_names and any(w in text for w in words)
                ),
                None,
            )
            probs[i, :] = 0.3 / max(k - 1, 1) if hit is not None else 0.5 / max(k - 1, 1)
            probs[i, hit if hit is not None else self.fallback] = 0.7 if hit is not None else 0.5
            urgent[i] = 0.9 if any(w in text for w in URGENT_KEYWORDS) else 0.1
            refund[i] = 0.8 if any(w in text for w in RECOVERABLE_KEYWORDS) else 0.2
        return {
            "intent_logits": np.log(probs / probs.sum(1, keepdims=True)),
            "urgent_logit": _log_odds(urgent),
            "refund_recoverable_logit": _log_odds(refund),
        }
