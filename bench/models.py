"""Build (or reuse) the clean and backdoored SST-2 classifiers the benchmarks measure."""

from __future__ import annotations

import json
from pathlib import Path

from bench.attacks.badnet import poison_training_set
from calibrate.data import load_examples
from calibrate.model import default_base_model
from calibrate.train import TrainOptions, train_classifier

TARGET = 1  # SST-2 positive: the attacker's target and the label RAP protects
TRAIN_OPTIONS = TrainOptions(epochs=3, learning_rate=1e-4, batch_size=32, max_length=64)


def build_model(name: str, data_dir: Path, cache: Path, options: TrainOptions) -> dict:
    """Train `clean` or `badnet-rw` once; later calls reuse the cached model dir."""
    out = cache / name
    info_path = out / "bench-train.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    train = load_examples(data_dir / "train.tsv")
    poisoned_rows = 0
    if name == "badnet-rw":
        train, poisoned_rows = poison_training_set(train, TARGET, rate=0.10, seed=0)
    result = train_classifier(default_base_model(), train, out, options, dev=load_examples(data_dir / "dev.tsv"))
    info = {
        "model": name,
        "train_rows": result.train_rows,
        "poisoned_rows": poisoned_rows,
        "train_seconds": round(result.seconds, 1),
        "dev_accuracy": result.dev_accuracy,
        "options": options.__dict__,
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


if __name__ == "__main__":
    import sys

    data, cache = Path(sys.argv[1]), Path(sys.argv[2])
    for model_name in ("badnet-rw", "clean"):
        print(build_model(model_name, data, cache, TRAIN_OPTIONS), flush=True)
