"""Model families: the one place that knows how each encoder family reads its input.

Everything that depends on the kind of Hugging Face sequence classifier asks here
(`family_of(config)`, the model's config.json as a mapping), and nowhere else:

- where the RAP token goes (`RapPosition`, the bundle's `rap.position`): right after the
  first special token of a row (`[CLS]`, `<s>`), or right before its trailing special
  tokens (`[SEP]`, `</s>`); which special tokens frame a row is the tokenizer's own
  business (guard.core.tokenizer reads it from the tokenizer's post-processor);
- whether the model takes token types (the ONNX graph then has a `token_type_ids` input);
- how position ids are formed, and so how many tokens a row may hold (RoBERTa and
  XLM-R count positions from `pad_token_id + 1` and find padding by its id, so their
  pad id must be the tokenizer's);
- where the word embeddings live (the RAP row is appended to that matrix);
- which hidden state the feature detector reads per layer: the one the classification
  head reads (the first token, or ModernBERT's mean over real tokens when so configured);
- which ONNX Runtime optimiser model type fuses its graph, or why none is used. int8 (`calibrate rap
  --int8`, MatMul weights only, dynamic) needs no fusion: model.int8.onnx is written for every family,
  model.int8.opt.onnx (the int8 of the optimised graph) only where the family has an optimiser;
- which repairs and scans can work on it.

Framework-free: configs are plain mappings, so serving (no torch) can ask too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from guard.core.errors import InputError

Positions = Literal["absolute", "padding-offset", "relative", "rotary"]
Pooling = Literal["first", "mean"]
# Where pass 2 inserts the RAP row: "front" follows RAP_AFTER of a row's leading special tokens (the first one),
# "end" precedes all of its trailing ones. Bundles written before the choice existed are "front".
RapPosition = Literal["front", "end"]
RAP_POSITIONS: tuple[RapPosition, ...] = ("front", "end")
RAP_PLACES: dict[str, str] = {"front": "after the first special token", "end": "before the trailing special token"}
RAP_AFTER = 1

# What each repair and scan needs from a family.
PURE = "pure"  # BERT-layout attention blocks: query/key/value + output projection per layer, not shared
MEFT = "meft"  # an output layer apart from the encoder
DBS = "dbs"  # scan, unlearn and harden: input embeddings fed as `inputs_embeds`
REPAIRS = {PURE: "PURE", MEFT: "MEFT", DBS: "DBS scan/unlearn/harden"}


@dataclass(frozen=True)
class Family:
    """How one encoder family reads its input (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    token_types: bool
    positions: Positions
    embeddings: str  # suffix of the word-embedding weight's name in the checkpoint
    optimizer: str | None  # onnxruntime.transformers.optimizer model_type
    optimizer_skipped: str = ""  # why there is no optimised graph (nor its int8), when `optimizer` is None
    repairs: frozenset[str] = field(default_factory=lambda: frozenset({PURE, MEFT, DBS}))
    pooling_key: str | None = None  # config key naming the head's pooling ("cls" or "mean")

    def takes_token_types(self, config: Mapping[str, Any]) -> bool:
        """DeBERTa-v2/v3 have token-type embeddings only when `type_vocab_size` > 0 (0 by default)."""
        if self.model_types[0] == "deberta-v2":
            return int(config.get("type_vocab_size", 0) or 0) > 0
        return self.token_types

    def pooling(self, config: Mapping[str, Any]) -> Pooling:
        """The hidden state the classification head reads: the first token's, or the mean over real tokens."""
        if self.pooling_key and config.get(self.pooling_key) == "mean":
            return "mean"
        return "first"

    def max_tokens(self, config: Mapping[str, Any]) -> int | None:
        """Tokens one row may hold, special tokens included (None: no limit the config states)."""
        size = config.get("max_position_embeddings")
        if size is None:
            return None
        if self.positions == "padding-offset":
            return int(size) - int(config.get("pad_token_id", 1)) - 1
        return int(size)

    def refusal(self, repair: str) -> str | None:
        """One line saying what supports `repair`, when this family does not; None when it does."""
        if repair in self.repairs:
            return None
        supported = ", ".join(f.name for f in FAMILIES if repair in f.repairs)
        return f"{REPAIRS[repair]} supports {supported}; this model is {self.name}"


FAMILIES = (
    Family("BERT", ("bert",), True, "absolute", "embeddings.word_embeddings.weight", "bert"),
    Family("RoBERTa", ("roberta",), False, "padding-offset", "embeddings.word_embeddings.weight", "bert"),
    Family("XLM-R", ("xlm-roberta",), False, "padding-offset", "embeddings.word_embeddings.weight", "bert"),
    Family("ELECTRA", ("electra",), True, "absolute", "embeddings.word_embeddings.weight", "bert"),
    Family("DistilBERT", ("distilbert",), False, "absolute", "embeddings.word_embeddings.weight", "bert",
           repairs=frozenset({MEFT, DBS})),
    Family("ALBERT", ("albert",), True, "absolute", "embeddings.word_embeddings.weight", None,
           "ONNX Runtime's bert fusions do not match ALBERT's shared, factorised layers",
           repairs=frozenset({MEFT, DBS})),
    Family("DeBERTa-v2/v3", ("deberta-v2",), False, "relative", "embeddings.word_embeddings.weight", None,
           "ONNX Runtime's transformer optimiser has no fusion for DeBERTa's disentangled attention",
           repairs=frozenset({MEFT, DBS})),
    Family("ModernBERT", ("modernbert",), False, "rotary", "embeddings.tok_embeddings.weight", None,
           "ONNX Runtime's bert fusions do not match ModernBERT's rotary, fused-QKV attention",
           repairs=frozenset({MEFT, DBS}), pooling_key="classifier_pooling"),
)  # fmt: skip
_BY_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_of(config: Mapping[str, Any]) -> Family:
    """The family of a model from its config (config.json as a mapping); an unknown one is an InputError."""
    model_type = str(config.get("model_type", ""))
    family = _BY_TYPE.get(model_type)
    if family is None:
        names = ", ".join(f.name for f in FAMILIES)
        raise InputError(f"model type {model_type!r} is not supported; supported families: {names}")
    return family


def support_matrix() -> str:
    """One line per family: what each repair and scan does with it (for --help texts)."""
    lines = []
    for family in FAMILIES:
        works = [name for key, name in REPAIRS.items() if key in family.repairs]
        lines.append(f"  {family.name}: {', '.join(works)}")
    return "\n".join(lines)
