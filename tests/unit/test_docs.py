"""The docs say what the code does: generated blocks are current, names they use exist.

The site itself is built with `mkdocs build --strict` in `make test` (links, anchors, nav).
"""

from __future__ import annotations

import re

import pytest

from docs import gen
from guard.api import errors

RUNBOOKS = gen.ROOT / "docs" / "operator" / "runbooks.md"


def test_every_generated_block_is_current() -> None:
    stale = [str(p.relative_to(gen.ROOT)) for p in gen.stale()]
    assert not stale, f"run `python -m docs.gen` (or `make docs`): stale generated blocks in {stale}"


def test_every_generator_has_a_block_and_every_block_a_generator() -> None:
    assert gen.blocks_used() == set(gen.GENERATORS)


def test_render_replaces_only_between_the_markers() -> None:
    text = "before\n<!-- generated: headline -->\nold table\n<!-- /generated: headline -->\nafter\n"
    out = gen.render(text)
    assert out.startswith("before\n<!-- generated: headline -->\n| dataset |")
    assert out.endswith("<!-- /generated: headline -->\nafter\n")
    assert "old table" not in out


def test_an_unknown_block_is_an_error() -> None:
    with pytest.raises(KeyError, match="unknown generated block 'nope'"):
        gen.render("<!-- generated: nope -->\n<!-- /generated: nope -->")


def test_the_settings_table_lists_every_setting_and_its_default() -> None:
    table = gen.settings_table()
    assert "| `bundle` | `GUARD_BUNDLE` | (required) |" in table
    assert "| `live_rates_min_observations` | `GUARD_LIVE_RATES_MIN_OBSERVATIONS` | `50` |" in table
    assert "| `upstream_text_pointer` | `GUARD_UPSTREAM_TEXT_POINTER` | unset |" in table
    assert "| `optimized_graphs` | `GUARD_OPTIMIZED_GRAPHS` | `true` |" in table


def test_the_metrics_table_says_where_the_score_histogram_is_served() -> None:
    rows = {row.split(" | ")[0].strip("| `"): row for row in gen.metrics_table().splitlines()[2:]}
    scrape_only = [name for name, row in rows.items() if "`metrics_port` only" in row]
    assert len(scrape_only) == 1 and scrape_only[0].startswith("guard_rap_"), scrape_only  # the live score histogram
    assert "both ports" in rows["guard_requests_total"]
    assert "`reason`" in rows["guard_connections_dropped_total"]


def _named_in_docs(pattern: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for page in gen.pages():
        for name in re.findall(pattern, page.read_text()):
            found.setdefault(name, []).append(str(page.relative_to(gen.ROOT)))
    return found


def test_every_guard_name_in_the_docs_is_a_metric_or_an_error_type() -> None:
    error_types = {
        cls.error_type for cls in vars(errors).values() if isinstance(cls, type) and hasattr(cls, "error_type")
    }
    known = gen.metric_names() | error_types
    unknown = {name: pages for name, pages in _named_in_docs(r"\bguard_[a-z0-9_]+\b").items() if name not in known}
    assert not unknown, f"not a metric of guard.metrics nor an error type: {unknown}"


def test_every_environment_variable_in_the_docs_is_a_setting() -> None:
    from guard.settings import Settings

    known = {f"GUARD_{name.upper()}" for name in Settings.model_fields}
    unknown = {name: pages for name, pages in _named_in_docs(r"\bGUARD_[A-Z0-9_]+\b").items() if name not in known}
    assert not unknown, f"no such setting: {unknown}"


@pytest.mark.parametrize(
    ("prog", "name"), [(prog, name) for prog, commands in gen.subcommands().items() for name in commands]
)
def test_every_command_help_has_an_example(prog: str, name: str) -> None:
    text = gen.help_text(gen.subcommands()[prog][name])
    examples = [line for line in text.splitlines() if line.strip().startswith(f"{prog} {name}")]
    assert examples, f"`{prog} {name} --help` shows no example"


def test_every_alert_has_a_runbook() -> None:
    headings = set(re.findall(r"^## (\w+)$", RUNBOOKS.read_text(), re.M))
    assert set(gen.alerts()) <= headings, f"alerts without a runbook: {set(gen.alerts()) - headings}"
    assert headings <= set(gen.alerts()), f"runbooks for no alert: {headings - set(gen.alerts())}"


def test_the_readme_fits_on_two_screens() -> None:
    assert len((gen.ROOT / "README.md").read_text().splitlines()) <= 120


def test_every_benchmark_result_page_is_in_the_site_nav() -> None:
    """mkdocs --strict refuses a page outside the nav; the benchmarks' own .md files join the site (docs/hooks.py)."""
    nav = (gen.ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in gen.RESULTS.glob("*.md"))
    assert pages, "no benchmark result pages"
    missing = [name for name in pages if f"benchmarks/results/{name}" not in nav]
    assert not missing, f"add to mkdocs.yml's nav: {missing}"
