"""The multi-task triage model: one encoder, three heads (intent, urgent, refund_recoverable).

``KefuTriageModel`` is a transformers ``PreTrainedModel`` registered with ``AutoConfig``/``AutoModel``
(import this module first), so ``save_pretrained``/``from_pretrained`` work on a plain directory that
needs no hub: the encoder is rebuilt from the encoder config stored in ``config.json``.

Also the one way every later stage runs a trained model: :func:`load_model`, :func:`encode`,
:func:`predict_logits`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from kefu_triage.core.heads import OUTPUT_NAMES
from kefu_triage.core.inputs import build_input


class KefuTriageConfig(PretrainedConfig):
    model_type = "kefu_triage"

    def __init__(
        self,
        encoder: dict[str, Any] | None = None,
        encoder_name: str = "",
        intent_labels: Sequence[str] = (),
        intent_routes: Sequence[str] = (),
        taxonomy: dict[str, Any] | None = None,
        pooling: str = "mean",
        head_dropout: float = 0.1,
        loss_weights: dict[str, float] | None = None,
        intent_class_weights: Sequence[float] | None = None,
        urgent_pos_weight: float = 1.0,
        refund_pos_weight: float = 1.0,
        focal_gamma: float = 0.0,
        label_smoothing: float = 0.0,
        context_turns: int = 0,
        max_seq_length: int = 128,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if pooling not in ("mean", "cls"):
            raise ValueError(f"model pooling must be 'mean' or 'cls', got {pooling!r}")
        self.encoder = dict(encoder or {})
        self.encoder_name = encoder_name
        self.intent_labels = list(intent_labels)
        self.intent_routes = list(intent_routes)
        self.taxonomy = taxonomy or {}
        self.pooling = pooling
        self.head_dropout = head_dropout
        self.loss_weights = dict(loss_weights or {"intent": 1.0, "urgent": 1.0, "refund_recoverable": 1.0})
        self.intent_class_weights = list(intent_class_weights) if intent_class_weights is not None else None
        self.urgent_pos_weight = float(urgent_pos_weight)
        self.refund_pos_weight = float(refund_pos_weight)
        self.focal_gamma = float(focal_gamma)
        self.label_smoothing = float(label_smoothing)
        self.context_turns = int(context_turns)
        self.max_seq_length = int(max_seq_length)  # not "max_length": transformers reserves it for generation

    @property
    def num_intents(self) -> int:
        return len(self.intent_labels)

    def get_taxonomy(self):
        """The label contract the model was trained on, in class-id order."""
        from kefu_triage.core.taxonomy import Taxonomy

        stored = Taxonomy.from_dict(self.taxonomy, source="config.json") if self.taxonomy else None
        info = {i.name: {"zh": i.zh, "examples": list(i.examples)} for i in (stored.intents if stored else ())}
        intents = {n: {"route": r, **info.get(n, {})} for n, r in zip(self.intent_labels, self.intent_routes, strict=True)}
        return Taxonomy.from_dict({"version": stored.version if stored else 1, "intents": intents,
                                   "heads": stored.heads if stored else {}}, source="config.json")

    def encoder_config(self) -> PretrainedConfig:
        enc = dict(self.encoder)
        model_type = enc.pop("model_type", "bert")
        cfg = AutoConfig.for_model(model_type, **enc)
        cfg._attn_implementation = "eager"  # the ONNX export fuses eager attention only
        return cfg


@dataclass
class TriageOutput(ModelOutput):
    loss: torch.Tensor | None = None
    intent_logits: torch.Tensor | None = None
    urgent_logit: torch.Tensor | None = None
    refund_recoverable_logit: torch.Tensor | None = None


class KefuTriageModel(PreTrainedModel):
    config_class = KefuTriageConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True
    _supports_attention_backend = False

    def __init__(self, config: KefuTriageConfig):
        super().__init__(config)
        if config.num_intents < 2:
            raise ValueError("KefuTriageConfig.intent_labels must list at least two intents")
        self.encoder = AutoModel.from_config(config.encoder_config(), add_pooling_layer=False)
        hidden = self.encoder.config.hidden_size
        self.dropout = nn.Dropout(config.head_dropout)
        self.intent_head = nn.Linear(hidden, config.num_intents)
        self.urgent_head = nn.Linear(hidden, 1)
        self.refund_head = nn.Linear(hidden, 1)
        weights = config.intent_class_weights
        self.register_buffer(
            "intent_class_weights",
            torch.tensor(weights if weights is not None else [1.0] * config.num_intents, dtype=torch.float32),
            persistent=False,
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # BERT's initialisation; pretrained weights overwrite the encoder's afterwards
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def from_encoder(cls, encoder: PreTrainedModel, config: KefuTriageConfig) -> KefuTriageModel:
        """A fresh model around a pretrained encoder (the heads start random)."""
        config.encoder = {k: v for k, v in encoder.config.to_dict().items()
                          if k not in ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype")}
        model = cls(config)
        missing, unexpected = model.encoder.load_state_dict(encoder.state_dict(), strict=False)
        if [k for k in missing if not k.startswith("pooler")]:
            raise ValueError(f"encoder weights do not fit the stored encoder config: missing {missing[:5]}")
        return model

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.config.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        intent_labels: torch.Tensor | None = None,
        urgent_labels: torch.Tensor | None = None,
        refund_labels: torch.Tensor | None = None,
        **unused: Any,
    ) -> TriageOutput:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        pooled = self.dropout(self.pool(hidden, attention_mask))
        intent_logits = self.intent_head(pooled)
        urgent_logit = self.urgent_head(pooled).squeeze(-1)
        refund_logit = self.refund_head(pooled).squeeze(-1)
        loss = None
        if intent_labels is not None:
            loss = self.compute_loss(intent_logits, urgent_logit, refund_logit, intent_labels, urgent_labels, refund_labels)
        return TriageOutput(loss=loss, intent_logits=intent_logits, urgent_logit=urgent_logit,
                            refund_recoverable_logit=refund_logit)

    def compute_loss(self, intent_logits, urgent_logit, refund_logit, intent_labels, urgent_labels, refund_labels):
        cfg, w = self.config, self.config.loss_weights
        ce = F.cross_entropy(intent_logits, intent_labels, weight=self.intent_class_weights.to(intent_logits.dtype),
                             reduction="none", label_smoothing=cfg.label_smoothing)
        if cfg.focal_gamma > 0:  # focal loss: down-weight examples the model already gets right
            pt = torch.softmax(intent_logits, -1).gather(1, intent_labels[:, None]).squeeze(1).detach()
            ce = ce * (1 - pt) ** cfg.focal_gamma
        weights = self.intent_class_weights.to(intent_logits.dtype)[intent_labels]
        loss = w.get("intent", 1.0) * ce.sum() / weights.sum()
        if urgent_labels is not None:
            loss = loss + w.get("urgent", 1.0) * F.binary_cross_entropy_with_logits(
                urgent_logit, urgent_labels.to(urgent_logit.dtype),
                pos_weight=urgent_logit.new_tensor(cfg.urgent_pos_weight))
        if refund_labels is not None:
            # masked: only examples with a refund label (>= 0) train this head; never a fake 0
            mask = refund_labels >= 0
            if mask.any():
                refund_loss = F.binary_cross_entropy_with_logits(
                    refund_logit[mask], refund_labels[mask].to(refund_logit.dtype),
                    pos_weight=refund_logit.new_tensor(cfg.refund_pos_weight))
            else:  # keep the head in the graph (DDP expects every parameter to get a gradient)
                refund_loss = refund_logit.sum() * 0.0
            loss = loss + w.get("refund_recoverable", 1.0) * refund_loss
        return loss


AutoConfig.register(KefuTriageConfig.model_type, KefuTriageConfig, exist_ok=True)
AutoModel.register(KefuTriageConfig, KefuTriageModel, exist_ok=True)


# ---------------------------------------------------------------------------------------------------
# The one way to load and run a trained model (eval, export, bench use these)
# ---------------------------------------------------------------------------------------------------
class ModelDirError(ValueError):
    """A model directory that is missing or not a kefu-triage model."""


def load_model(model_dir: str | Path):
    """``(model in eval mode, tokenizer)`` from a directory written by training."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelDirError(f"{model_dir}: not a model directory (no config.json); train one with `make train`")
    model = KefuTriageModel.from_pretrained(model_dir)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def encode(tokenizer, texts: Sequence[Any], contexts: Sequence[Any] | None, context_turns: int, max_length: int,
           padding: bool = False, return_tensors: str | None = None) -> dict[str, Any]:
    """Tokenise messages (+ previous turns as a second segment) exactly as the runtime does."""
    contexts = contexts if contexts is not None else [None] * len(texts)
    pairs = [build_input(t, c, context_turns) for t, c in zip(texts, contexts, strict=True)]
    firsts = [p[0] for p in pairs]
    seconds = [p[1] for p in pairs]
    kwargs = dict(truncation="longest_first", max_length=max_length, padding=padding, return_tensors=return_tensors)
    if any(s is not None for s in seconds):
        # a message without context gets an empty second segment only when others in the batch have one;
        # tokenising it alone (as the runtime does) must give the same ids, so split the batch
        with_ctx = [i for i, s in enumerate(seconds) if s is not None]
        if len(with_ctx) != len(seconds):
            parts = [encode(tokenizer, [texts[i]], [contexts[i]], context_turns, max_length) for i in range(len(texts))]
            out = {k: [p[k][0] for p in parts] for k in parts[0]}
            return tokenizer.pad(out, return_tensors=return_tensors) if padding else out
        return dict(tokenizer(firsts, seconds, **kwargs))
    return dict(tokenizer(firsts, **kwargs))


@torch.no_grad()
def predict_logits(model: KefuTriageModel, tokenizer, records: Sequence[dict[str, Any]], batch_size: int = 64
                   ) -> dict[str, np.ndarray]:
    """Raw logits of the three heads for records with ``text`` (and optional ``context``)."""
    model.eval()
    cfg = model.config
    order = sorted(range(len(records)), key=lambda i: len(records[i]["text"]))  # less padding
    outs: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUT_NAMES}
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = encode(tokenizer, [records[i]["text"] for i in idx], [records[i].get("context") for i in idx],
                       cfg.context_turns, cfg.max_seq_length, padding=True, return_tensors="pt")
        out = model(**{k: v.to(device) for k, v in batch.items()})
        for k in OUTPUT_NAMES:
            outs[k].append(getattr(out, k).float().cpu().numpy())
    result = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in outs.items()}
    inverse = np.argsort(np.asarray(order, dtype=int))
    return {k: v[inverse] for k, v in result.items()}
