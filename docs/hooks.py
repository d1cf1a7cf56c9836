"""MkDocs hook: pages that live outside docs/ join the site as they are, never copied into git.

- bench/results/*.md (and the plots they show) -> benchmarks/results/: written by the benchmarks
  themselves from their JSON, so the site shows exactly what was measured.
- helm/backdoor-guard/README.md -> operator/chart-values.md: generated from the chart's values.yaml
  (`make chart-readme`).
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CHART_README = ROOT / "helm" / "backdoor-guard" / "README.md"


def on_files(files: Files, config) -> Files:
    for path in sorted(RESULTS.glob("*.md")) + sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"benchmarks/results/{path.name}", abs_src_path=str(path)))
    if CHART_README.is_file():
        files.append(File.generated(config, "operator/chart-values.md", abs_src_path=str(CHART_README)))
    return files
