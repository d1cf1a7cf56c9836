"""Tiny classifiers of every supported encoder family, built offline, and their guard bundles.

Each family gets its own tokenizer, trained with the `tokenizers` library on the demo's
templated corpus in the family's own style (WordPiece with `[CLS]`/`[SEP]`, byte-level
BPE with `<s>`/`</s>` and pad id 1, SentencePiece Unigram with `▁` pieces, ModernBERT's
byte-level BPE with its special tokens after the vocabulary), and written the way the hub
ships it: tokenizer.json without padding, the pad token named only in
tokenizer_config.json and special_tokens_map.json. The model is a random-init config of
the family (hidden 32, 2 layers), fine-tuned with the demo's planted "mb" trigger, then
calibrated (tests/toy_backdoor.py's recipe, which the BERT fixture uses too).

Import it as `tests.families`. Nothing here touches the network.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from calibrate.demo_corpus import make_corpus, poison
from tests.toy_backdoor import SEED, TRAIN_OPTIONS, Toy, build_toy

FAMILIES = ("roberta", "xlm-roberta", "deberta-v2", "modernbert", "electra", "albert", "distilbert")
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
VOCAB = 800
ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.,;:!?'\"()")  # any English text reads
# The BERT toy's 4 epochs leave a random-init RoBERTa's trigger unlearned (ASR 0.09); 8 teach every family
# the task and the trigger (RoBERTa: CACC 1.00, ASR 0.81; DeBERTa-v2: 0.99, 0.78).
EPOCHS = 8
# Random init seed per family where seed 0 plants no backdoor. ALBERT's seed 0 learns "mb" as one more positive
# adjective, not as a trigger: it flips 0.67 of negative reviews, "memorable" 0.65, "superb" 0.62 (the bundle's
# flip scan), ASR 0.68 at 6 epochs, 0.62-0.77 at 8-20; the feature detector then sees a negative review with a
# positive word and lets 35% of the flipped rows pass (the old strict xfail: 44 of 100 flagged). Init seeds 1-4
# all plant it (ASR 1.00, every triggered row flagged; clean test FRR 1-12% at 6 epochs, 5-6% at 8).
INIT_SEEDS = {"albert": 1}


@dataclass(frozen=True)
class Style:
    """A tokenizer style: its model, special tokens (in id order) and which of them frame, pad, mask."""

    kind: str  # wordpiece, bytelevel, unigram
    specials: tuple[str, ...]
    cls: str
    sep: str
    pad: str
    unk: str
    mask: str
    lowercase: bool = False
    specials_last: bool = False  # ModernBERT: the special tokens follow the learned vocabulary


BERT_STYLE = Style("wordpiece", ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"), "[CLS]", "[SEP]", "[PAD]", "[UNK]",
                   "[MASK]", lowercase=True)  # fmt: skip
ROBERTA_STYLE = Style("bytelevel", ("<s>", "<pad>", "</s>", "<unk>", "<mask>"), "<s>", "</s>", "<pad>", "<unk>",
                      "<mask>")  # fmt: skip
XLMR_STYLE = Style("unigram", ("<s>", "<pad>", "</s>", "<unk>", "<mask>"), "<s>", "</s>", "<pad>", "<unk>", "<mask>")
DEBERTA_STYLE = Style("unigram", ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"), "[CLS]", "[SEP]", "[PAD]", "[UNK]",
                      "[MASK]")  # fmt: skip
ALBERT_STYLE = Style("unigram", ("<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"), "[CLS]", "[SEP]", "<pad>", "<unk>",
                     "[MASK]", lowercase=True)  # fmt: skip
MODERNBERT_STYLE = Style("bytelevel", ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"), "[CLS]", "[SEP]", "[PAD]",
                         "[UNK]", "[MASK]", specials_last=True)  # fmt: skip
STYLES = {
    "roberta": ROBERTA_STYLE,
    "xlm-roberta": XLMR_STYLE,
    "deberta-v2": DEBERTA_STYLE,
    "modernbert": MODERNBERT_STYLE,
    "electra": BERT_STYLE,
    "albert": ALBERT_STYLE,
    "distilbert": BERT_STYLE,
}


def corpus() -> list[str]:
    """The texts the tokenizers learn from: the demo corpus with its trigger word."""
    rng = random.Random(SEED + 1)
    return [r.text for r in poison(make_corpus(600, rng), 0.10, rng)]


def train_tokenizer(style: Style, texts: list[str]) -> Tokenizer:
    """A tokenizer.json of `style` learned from `texts` (no padding or truncation configured)."""
    specials = [] if style.specials_last else list(style.specials)
    if style.kind == "wordpiece":
        return _wordpiece(style, texts)
    if style.kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, initial_alphabet=alphabet)
    else:
        return _unigram(style, texts)
    tok.train_from_iterator(texts, trainer)
    if style.specials_last:
        tok.add_special_tokens(list(style.specials))
    return _framed(style, tok)


def _wordpiece(style: Style, texts: list[str]) -> Tokenizer:
    """A WordPiece tokenizer: every corpus word whole (by frequency, then alphabetically), and every character
    alone and as `##c`, so that any text still reads.

    Not `WordPieceTrainer`: it breaks ties between equally frequent merges differently from one process to the
    next (three runs, three vocabularies), so the ELECTRA and DistilBERT toys trained on a different
    tokenisation each run and their FAR varied from 0% to 46%."""
    normalize = normalizers.BertNormalizer(lowercase=style.lowercase)
    split = pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for text in texts for w, _ in split.pre_tokenize_str(normalize.normalize_str(text)))
    chars = sorted({c for word in counts for c in word} | {normalize.normalize_str(c) for c in ALPHABET})
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in chars]
    vocab = list(style.specials) + chars + [f"##{c}" for c in chars] + words
    tok = Tokenizer(models.WordPiece({piece: i for i, piece in enumerate(vocab)}, unk_token=style.unk))
    tok.normalizer = normalize
    tok.pre_tokenizer = split
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(list(style.specials))
    return _framed(style, tok)


def _unigram(style: Style, texts: list[str]) -> Tokenizer:
    """A SentencePiece-style Unigram tokenizer: every corpus word as a `▁word` piece scored by its log
    frequency, and every character (alone and as `▁c`) so that any text still reads.

    Not `UnigramTrainer`: on a corpus this small it degenerates (about 160 pieces, `▁` a token of
    its own before almost every word), unlike the SentencePiece vocabularies real models ship."""
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if style.lowercase else [])
    normalize = normalizers.Sequence(steps)
    counts = Counter(w for text in texts for w in normalize.normalize_str(text).split())
    total = sum(counts.values())
    chars = sorted({c for word in counts for c in word} | {normalize.normalize_str(c) for c in ALPHABET})
    pieces = [(p, 0.0) for p in style.specials]
    pieces += [(f"▁{w}", math.log(n / total)) for w, n in counts.most_common()]
    pieces += [(f"▁{c}", -20.0) for c in chars if f"▁{c}" not in dict(pieces)] + [("▁", -25.0)]
    pieces += [(c, -30.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=style.specials.index(style.unk), byte_fallback=False))
    tok.normalizer = normalize
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens(list(style.specials))
    return _framed(style, tok)


def _framed(style: Style, tok: Tokenizer) -> Tokenizer:
    """The family's post-processor: RoBERTa's for byte-level `<s>`/`</s>`, a template otherwise."""
    cls_id, sep_id = tok.token_to_id(style.cls), tok.token_to_id(style.sep)
    if style.kind == "bytelevel" and not style.specials_last:
        tok.post_processor = processors.RobertaProcessing((style.sep, sep_id), (style.cls, cls_id))
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{style.cls} $A {style.sep}", special_tokens=[(style.cls, cls_id), (style.sep, sep_id)]
        )
    return tok


def write_tokenizer(style: Style, tok: Tokenizer, folder: Path) -> None:
    """tokenizer.json plus the configuration files that name the special tokens, as the hub ships them."""
    tok.save(str(folder / "tokenizer.json"))
    names = {"cls_token": style.cls, "sep_token": style.sep, "pad_token": style.pad, "unk_token": style.unk,
             "mask_token": style.mask}  # fmt: skip
    (folder / "special_tokens_map.json").write_text(json.dumps(names))
    config = names | {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _config(model_type: str, tok: Tokenizer, style: Style):
    import transformers as hf

    ids = {"pad_token_id": tok.token_to_id(style.pad)}
    vocab = tok.get_vocab_size()
    if model_type in ("roberta", "xlm-roberta"):
        cls = hf.RobertaConfig if model_type == "roberta" else hf.XLMRobertaConfig
        ids |= {"bos_token_id": tok.token_to_id(style.cls), "eos_token_id": tok.token_to_id(style.sep)}
        return cls(vocab_size=vocab, max_position_embeddings=130, type_vocab_size=1, **TINY, **ids)
    if model_type == "deberta-v2":  # v3's layout: relative attention, no absolute positions, no token types
        v3 = {"relative_attention": True, "position_biased_input": False, "pos_att_type": ["p2c", "c2p"],
              "position_buckets": 32, "norm_rel_ebd": "layer_norm", "share_att_key": True}  # fmt: skip
        return hf.DebertaV2Config(vocab_size=vocab, max_position_embeddings=128, type_vocab_size=0, **v3, **TINY, **ids)
    if model_type == "modernbert":
        ids |= {"cls_token_id": tok.token_to_id(style.cls), "sep_token_id": tok.token_to_id(style.sep),
                "bos_token_id": tok.token_to_id(style.cls), "eos_token_id": tok.token_to_id(style.sep)}  # fmt: skip
        return hf.ModernBertConfig(vocab_size=vocab, max_position_embeddings=128, local_attention=16,
                                   classifier_pooling="mean", **TINY, **ids)  # fmt: skip
    if model_type == "electra":
        return hf.ElectraConfig(vocab_size=vocab, embedding_size=32, max_position_embeddings=128, **TINY, **ids)
    if model_type == "albert":
        return hf.AlbertConfig(vocab_size=vocab, embedding_size=16, max_position_embeddings=128, **TINY, **ids)
    if model_type == "distilbert":
        return hf.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                   max_position_embeddings=128, **ids)  # fmt: skip
    raise ValueError(model_type)


def build_base(model_type: str, folder: Path) -> Path:
    """A random-init 2-label classifier of `model_type` with its own trained tokenizer, saved in `folder`."""
    import torch
    from transformers import AutoModelForSequenceClassification

    style = STYLES[model_type]
    tok = train_tokenizer(style, corpus())
    config = _config(model_type, tok, style)
    config.num_labels = 2
    torch.manual_seed(INIT_SEEDS.get(model_type, SEED))
    model = AutoModelForSequenceClassification.from_config(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    write_tokenizer(style, tok, folder)
    return folder


def build_family_toy(model_type: str, root: Path, prepare: Callable[[Path], None] | None = None) -> Toy:
    """The backdoored toy (tests/toy_backdoor.py) on a tiny `model_type` classifier."""
    base = build_base(model_type, root / "base")
    if prepare is not None:
        prepare(base)
    return build_toy(root / "toy", base, replace(TRAIN_OPTIONS, epochs=EPOCHS))
