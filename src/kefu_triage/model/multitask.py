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

from kefu_triage.core.heads import OUTPUT_NAMES, POOLED_OUTPUT
from kefu_triage.core.inputs import configure_tokenizer, encode_inputs, pad_encodings


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
        class_weight_bias_removed: bool = False,
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
        # True once log(intent_class_weights) was taken out of the intent head's bias (remove_class_weight_bias)
        self.class_weight_bias_removed = bool(class_weight_bias_removed)

    @property
    def num_intents(self) -> int:
        return len(self.intent_labels)

    def get_taxonomy(self):
        """The label contract the model was trained on, in class-id order."""
        from kefu_triage.core.taxonomy import Taxonomy

        stored = Taxonomy.from_dict(self.taxonomy, source="config.json") if self.taxonomy else None
        info = {
            i.name: {"zh": i.zh, "examples": list(i.examples)} for i in (stored.intents if stored else ())
        }
        intents = {
            n: {"route": r, **info.get(n, {})}
            for n, r in zip(self.intent_labels, self.intent_routes, strict=True)
        }
        return Taxonomy.from_dict(
            {
                "version": stored.version if stored else 1,
                "intents": intents,
                "heads": stored.heads if stored else {},
            },
            source="config.json",
        )

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
    pooled: torch.Tensor | None = None  # the pooled encoder state before head dropout (novelty scoring)


class KefuTriageModel(PreTrainedModel):
    config_class = KefuTriageConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True
    _supports_attention_backend = False
    # the output layers on top of the pooled state (training gives them their own learning rate)
    HEAD_MODULES = ("intent_head", "urgent_head", "refund_head")

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
        self._set_class_weights()
        self.post_init()

    def _set_class_weights(self) -> None:
        weights = self.config.intent_class_weights
        self.register_buffer(
            "intent_class_weights",
            torch.tensor(
                weights if weights is not None else [1.0] * self.config.num_intents, dtype=torch.float32
            ),
            persistent=False,
        )

    def remove_class_weight_bias(self) -> list[float]:
        """Subtract log(w_c) from the intent head's bias, in place, and return the offsets subtracted.

        A loss that weights intent c by w_c trains the head towards p(c|x)·w_c (renormalised), so rare intents
        win more often than the data supports. That helps the features learn rare intents; at serving time it is
        a tilt away from the intents that make up most real traffic. Subtracting log w_c from the logits removes
        the tilt exactly (post-hoc logit adjustment, Menon et al., ICLR 2021) and keeps the features."""
        if self.config.class_weight_bias_removed:
            raise ValueError("the class-weight bias was already removed from this model's intent head")
        offsets = torch.log(self.intent_class_weights.to(self.intent_head.bias))
        with torch.no_grad():
            self.intent_head.bias -= offsets
        self.config.class_weight_bias_removed = True
        return [round(float(x), 6) for x in offsets]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        # transformers builds the model without initialising it and then loads the saved tensors only: the
        # non-persistent class-weight buffer would be left as uninitialised memory (a garbage or NaN loss)
        model._set_class_weights()
        return model

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
        config.encoder = {
            k: v
            for k, v in encoder.config.to_dict().items()
            if k not in ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype")
        }
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
        state = self.pool(hidden, attention_mask)
        pooled = self.dropout(state)
        intent_logits = self.intent_head(pooled)
        urgent_logit = self.urgent_head(pooled).squeeze(-1)
        refund_logit = self.refund_head(pooled).squeeze(-1)
        loss = None
        if intent_labels is not None:
            loss = self.compute_loss(
                intent_logits, urgent_logit, refund_logit, intent_labels, urgent_labels, refund_labels
            )
        return TriageOutput(
            loss=loss,
            intent_logits=intent_logits,
            urgent_logit=urgent_logit,
            refund_recoverable_logit=refund_logit,
            pooled=state,
        )

    def compute_loss(
        self, intent_logits, urgent_logit, refund_logit, intent_labels, urgent_labels, refund_labels
    ):
        cfg, w = self.config, self.config.loss_weights
        ce = F.cross_entropy(
            intent_logits,
            intent_labels,
            weight=self.intent_class_weights.to(intent_logits.dtype),
            reduction="none",
            label_smoothing=cfg.label_smoothing,
        )
        if cfg.focal_gamma > 0:  # focal loss: down-weight examples the model already gets right
            pt = torch.softmax(intent_logits, -1).gather(1, intent_labels[:, None]).squeeze(1).detach()
            ce = ce * (1 - pt) ** cfg.focal_gamma
        weights = self.intent_class_weights.to(intent_logits.dtype)[intent_labels]
        loss = w.get("intent", 1.0) * ce.sum() / weights.sum()
        if urgent_labels is not None:
            loss = loss + w.get("urgent", 1.0) * _masked_bce(
                urgent_logit, urgent_labels, cfg.urgent_pos_weight
            )
        if refund_labels is not None:
            loss = loss + w.get("refund_recoverable", 1.0) * _masked_bce(
                refund_logit, refund_labels, cfg.refund_pos_weight
            )
        return loss


def _masked_bce(logit: torch.Tensor, labels: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Binary cross-entropy over the rows with a label (>= 0); -1 = unknown or not applicable, never a fake 0."""
    mask = labels >= 0
    if not mask.any():  # keep the head in the graph (DDP expects every parameter to get a gradient)
        return logit.sum() * 0.0
    return F.binary_cross_entropy_with_logits(
        logit[mask], labels[mask].to(logit.dtype), pos_weight=logit.new_tensor(pos_weight)
    )


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
        raise ModelDirError(
            f"{model_dir}: not a model directory (no config.json); train one with `make train`"
        )
    model = KefuTriageModel.from_pretrained(model_dir)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def input_tokenizer(tokenizer, max_length: int):
    """The ``tokenizers.Tokenizer`` behind a HF fast tokenizer, configured as the runtime reads input (a copy:
    the HF wrapper keeps its own truncation state)."""
    from tokenizers import Tokenizer

    key = (max_length, "_kefu_input_tokenizer")
    cached = getattr(tokenizer, "_kefu_input_tokenizers", None)
    if cached is None:
        cached = {}
        tokenizer._kefu_input_tokenizers = cached
    if key not in cached:
        cached[key] = configure_tokenizer(
            Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()), max_length
        )
    return cached[key]


def encode(
    tokenizer,
    texts: Sequence[Any],
    contexts: Sequence[Any] | None,
    context_turns: int,
    max_length: int,
    padding: bool = False,
    return_tensors: str | None = None,
) -> dict[str, Any]:
    """Token ids of messages (+ previous turns) built exactly as the runtime builds them (core.inputs)."""
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    encodings = encode_inputs(input_tokenizer(tokenizer, max_length), texts, contexts, context_turns)
    if padding:
        feed = pad_encodings(encodings, tokenizer.pad_token_id, names)
        return {k: torch.from_numpy(v) for k, v in feed.items()} if return_tensors == "pt" else feed
    rows = {
        "input_ids": [e.ids for e in encodings],
        "attention_mask": [e.attention_mask for e in encodings],
        "token_type_ids": [e.type_ids for e in encodings],
    }
    return {k: rows[k] for k in names}


@torch.no_grad()
def predict_logits(
    model: KefuTriageModel,
    tokenizer,
    records: Sequence[dict[str, Any]],
    batch_size: int = 64,
    pooled: bool = False,
    progress: str | None = None,
) -> dict[str, np.ndarray]:
    """Raw logits of the three heads for records with ``text`` (and optional ``context``); with ``pooled``
    also the pooled encoder state under POOLED_OUTPUT ([N, hidden], for novelty). ``progress``: label of a
    progress bar over the batches (long scoring runs; None = no bar)."""
    model.eval()
    keys = OUTPUT_NAMES + ((POOLED_OUTPUT,) if pooled else ())
    outs: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    inverse, batches = length_ordered_batches(model, tokenizer, records, batch_size, progress)
    for batch in batches:
        out = model(**batch)
        for k in keys:
            outs[k].append(getattr(out, k).float().cpu().numpy())
    result = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in outs.items()}
    return {k: v[inverse] for k, v in result.items()}


def length_ordered_batches(
    model: KefuTriageModel,
    tokenizer,
    records: Sequence[dict[str, Any]],
    batch_size: int,
    progress: str | None = None,
):
    """``(inverse, batches)``: padded model-input batches on the model's device, records sorted by text length
    (less padding); ``inverse`` puts row-wise outputs concatenated over the batches back in input order.
    ``progress``: label of a tqdm bar over the batches (None = no bar)."""
    cfg = model.config
    order = sorted(range(len(records)), key=lambda i: len(records[i]["text"]))
    device = next(model.parameters()).device

    def batches():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = encode(
                tokenizer,
                [records[i]["text"] for i in idx],
                [records[i].get("context") for i in idx],
                cfg.context_turns,
                cfg.max_seq_length,
                padding=True,
                return_tensors="pt",
            )
            yield {k: v.to(device) for k, v in batch.items()}

    inverse = np.argsort(np.asarray(order, dtype=int))
    if progress is None:
        return inverse, batches()
    from tqdm.auto import tqdm

    total = -(-len(order) // batch_size)
    return inverse, tqdm(batches(), total=total, desc=progress, unit="batch", dynamic_ncols=True)
