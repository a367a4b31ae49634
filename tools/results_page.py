"""docs/results.md, generated from the records in tools/results/: every figure is read from a record, none is typed.

    python tools/results_page.py            # (re)write docs/results.md
    python tools/results_page.py --check    # exit 1 if docs/results.md is not what the records give

tools/results/index.yaml lists the entries: what was measured, its status (current or superseded, and by what),
where its date, commit, machine and command come from, the record file (or, for a result whose record was
replaced by a rerun, `records_in_git`: COMMIT:PATH), and the tables to draw from it. A value
written "@a.b.c" is read from the entry's record at that key path; "@other.json:a.b.c" from another record in
tools/results/. A table cell is such a path (without the "@"). tests/test_docs.py fails when the page and the
records disagree, or when a file in tools/results/ belongs to no entry.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import exposure_study  # noqa: E402  (a tool beside this one: the study's table is drawn by its own code)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "tools" / "results"
INDEX = RESULTS / "index.yaml"
PAGE = REPO / "docs" / "results.md"

HEADER = """# Results

Every figure on this page is read from a record in `tools/results/` by `tools/results_page.py`; nothing here is
typed by hand, and `tests/test_docs.py` fails when this page and the records disagree. To add a result: write its
record into `tools/results/`, add an entry to `tools/results/index.yaml`, run `python tools/results_page.py`.
Current results come first, newest first; superseded ones follow and say what replaced them.
"""


class RecordError(ValueError):
    pass


def load_record(name: str) -> Any:
    path = RESULTS / name
    if not path.is_file():
        raise RecordError(f"tools/results/{name}: no such record")
    return json.loads(path.read_text())


def lookup(ref: str, default_record: str | None) -> Any:
    """`a.b.c` in the default record, `file.json:a.b.c` in another; list items by index."""
    name, _, path = ref.rpartition(":") if ":" in ref else (default_record, "", ref)
    if not name:
        raise RecordError(f"{ref!r}: no record to read it from")
    value = load_record(name)
    for key in path.split("."):
        if isinstance(value, list):
            value = value[int(key)]
        elif isinstance(value, dict) and key in value:
            value = value[key]
        else:
            raise RecordError(f"tools/results/{name}: no key {key!r} in {path!r}")
    return value


def text_of(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {text_of(v)}" for k, v in value.items() if not isinstance(v, dict))
    if isinstance(value, str) and len(value) >= 16 and value[4] == "-" and value[10] == "T":
        return value[:16].replace("T", " ") + " UTC"  # ISO timestamps in the records are UTC
    return str(value)


def field(entry: dict, key: str) -> str:
    value = entry.get(key)
    if value is None:
        raise RecordError(f"entry {entry.get('id')!r}: {key} is required (write 'not recorded' if it was not)")
    if isinstance(value, str) and value.startswith("@"):
        return text_of(lookup(value[1:], entry.get("record")))
    return str(value)


def cell(spec: Any, fmt: str, record: str | None) -> str:
    if spec is None:
        return ""
    if isinstance(spec, dict):
        fmt = spec.get("format", fmt)
        spec = spec["ref"]
    value = lookup(spec, record)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt.format(value)
    return str(value)


def values_table(table: dict, record: str | None) -> list[str]:
    columns = table["columns"]
    fmt = table.get("format", "{:.3f}")
    lines = ["| " + " | ".join([table.get("label", "")] + columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for row in table["rows"]:
        cells = row["cells"]
        if len(cells) != len(columns):
            raise RecordError(f"row {row['label']!r}: {len(cells)} cells for {len(columns)} columns")
        lines.append("| " + " | ".join([row["label"]] + [cell(c, fmt, record) for c in cells]) + " |")
    return lines


def schedule_table(table: dict, record: str | None) -> list[str]:
    """The mean ± std table and the difference-from-baseline table of a tools/schedule_table.py record."""
    data = load_record(table.get("record", record))
    metrics = table["metrics"]
    rows = [r for r in data["rows"] if r in data["table"]]
    lines = ["| Approach | seeds | " + " | ".join(metrics) + " |", "| --- | ---: |" + " ---: |" * len(metrics)]
    for row in rows:
        m = data["table"][row]
        seeds = m[metrics[0]]["n"]
        lines.append(
            f"| {row} | {seeds} | " + " | ".join(f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" for k in metrics) + " |"
        )
    lines += [
        "",
        "Difference from the baseline (mean over seeds), 95% Welch interval; **bold**: the interval excludes 0.",
        "",
        "| Approach | " + " | ".join(metrics) + " |",
        "| --- |" + " ---: |" * len(metrics),
    ]
    for row in rows:
        if "vs_baseline" not in data["table"][row][metrics[0]]:
            continue
        parts = []
        for k in metrics:
            d = data["table"][row][k]["vs_baseline"]
            text = f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
            parts.append(f"**{text}**" if d["significant"] else text)
        lines.append(f"| {row} | " + " | ".join(parts) + " |")
    return lines


def compare_runs_table(table: dict, record: str | None) -> list[str]:
    """A tools/compare_runs.py table.json: mean ± std over seeds per row."""
    data = load_record(table.get("record", record))
    metrics = data["metrics"]
    lines = ["| run | seeds | " + " | ".join(metrics) + " |", "| --- | ---: |" + " ---: |" * len(metrics)]
    for row in data["rows"]:
        m = row["metrics"]
        lines.append(
            f"| {row['run']} | {row['n_seeds']} | "
            + " | ".join(f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" for k in metrics)
            + " |"
        )
    return lines


def record_rows_table(table: dict, record: str | None) -> list[str]:
    """One row per item of a list in a record (`rows_ref`), its label at `label_key`, columns {name: key}."""
    columns = table["columns"]
    fmt = table.get("format", "{:.3f}")
    lines = ["| " + " | ".join([table.get("label", "")] + list(columns)) + " |", "| --- |" + " ---: |" * len(columns)]

    def show(value: Any) -> str:
        if value is None:
            return "-"
        return fmt.format(value) if isinstance(value, float) else str(value)

    for item in lookup(table["rows_ref"], record):
        lines.append(
            "| " + " | ".join([str(item[table["label_key"]])] + [show(item[k]) for k in columns.values()]) + " |"
        )
    if table.get("last_row"):
        row = table["last_row"]
        lines.append("| " + " | ".join([row["label"]] + [cell(c, fmt, record) for c in row["cells"]]) + " |")
    return lines


def exposure_study_table(table: dict, record: str | None) -> list[str]:
    """A tools/exposure_study.py record, drawn by that tool's own table_rows (the metrics named in the entry)."""
    data = load_record(table.get("record", record))
    return exposure_study.table_rows(data["table"], data["lrs"], table["metrics"])


def exposure_contrasts_table(table: dict, record: str | None) -> list[str]:
    """The declared contrasts of a tools/exposure_study.py record (each target minus the paper's, same schedule)."""
    data = load_record(table.get("record", record))
    if not data.get("contrasts"):
        raise RecordError(f"{table.get('record', record)}: no contrasts (rebuild it with exposure_study --table-only)")
    return exposure_study.contrast_rows(data["contrasts"])


def exposure_overview_table(table: dict, record: str | None) -> list[str]:
    """One metric across several tools/exposure_study.py records (`studies`: {column label: record file})."""
    studies = {label: load_record(name) for label, name in table["studies"].items()}
    return exposure_study.overview_rows(studies, table["metric"])


def exposure_tuning_table(table: dict, record: str | None) -> list[str]:
    """A tools/exposure_study.py tuning record: per row the best val/scene/correct (and its step) at each learning
    rate of the grid, and the rate chosen."""
    data = load_record(table.get("record", record))
    rates = sorted({lr for cell in data["rows"].values() for lr in cell["grid"]}, key=float)
    lines = [
        "| row | " + " | ".join(f"lr {lr}" for lr in rates) + " | chosen |",
        "| --- |" + " ---: |" * (len(rates) + 1),
    ]
    for row, cell in data["rows"].items():
        shown = []
        for lr in rates:
            best = cell["grid"].get(lr)  # None: not in the row's grid, or no validation
            shown.append("-" if best is None else f"{best['val/scene/correct']:.3f} (step {best['step']})")
        lines.append(f"| {row} | " + " | ".join(shown) + f" | {cell['lr']:g} |")
    return lines


TABLES = {
    "values": values_table,
    "exposure_tuning": exposure_tuning_table,
    "schedule_table": schedule_table,
    "compare_runs": compare_runs_table,
    "record_rows": record_rows_table,
    "exposure_study": exposure_study_table,
    "exposure_contrasts": exposure_contrasts_table,
    "exposure_overview": exposure_overview_table,
}


def entry_lines(entry: dict) -> list[str]:
    lines = [f"### {entry['title']}", "", f'<a id="{entry["id"]}"></a>']
    if entry["status"] == "superseded":
        lines += ["", f"**Superseded**: {entry['superseded_by'].strip()}"]
    record = entry.get("record")
    files = ([record] if record else []) + list(entry.get("also", []))
    files = list(
        dict.fromkeys(files + [f for table in entry.get("tables", []) for f in table.get("studies", {}).values()])
    )
    lines += [
        "",
        f"- date: {field(entry, 'date')}",
        f"- commit: {field(entry, 'commit')}",
        f"- machine: {field(entry, 'machine')}",
        f"- command: `{field(entry, 'command')}`",
        "- record: " + ", ".join(f"`tools/results/{f}`" for f in files)
        if files
        else "- record: in git history, " + ", ".join(f"`git show {ref}`" for ref in entry["records_in_git"]),
    ]
    if entry.get("note"):
        lines += ["", entry["note"].strip()]
    for table in entry.get("tables", []):
        if table.get("caption"):
            lines += ["", table["caption"].strip()]
        lines += [""] + TABLES[table.get("kind", "values")](table, record)
    return lines + [""]


def sort_key(entry: dict) -> str:
    return field(entry, "date").replace("T", " ")[:16]


def render(index_path: Path = INDEX) -> str:
    entries = yaml.safe_load(index_path.read_text())["entries"]
    ids = [e["id"] for e in entries]
    if len(ids) != len(set(ids)):
        raise RecordError(f"{index_path.name}: duplicate entry ids")
    for e in entries:
        if e.get("status") not in ("current", "superseded"):
            raise RecordError(f"entry {e['id']!r}: status must be current or superseded (got {e.get('status')!r})")
        if e["status"] == "superseded" and not e.get("superseded_by"):
            raise RecordError(f"entry {e['id']!r}: a superseded entry says what superseded it (superseded_by)")
    out = [HEADER]
    for status, heading in (("current", "## Current"), ("superseded", "## Superseded")):
        chosen = sorted((e for e in entries if e["status"] == status), key=sort_key, reverse=True)
        out += [heading, ""]
        out += ["- [" + e["title"] + "](#" + e["id"] + ")" for e in chosen] + [""]
        for e in chosen:
            out += entry_lines(e)
    return "\n".join(out).rstrip("\n") + "\n"


def listed_files(index_path: Path = INDEX) -> set[str]:
    entries = yaml.safe_load(index_path.read_text())["entries"]
    names = set()
    for e in entries:
        names.update([e["record"]] if e.get("record") else [])
        names.update(e.get("also", []))
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/results.md differs from the records")
    args = parser.parse_args(argv)
    try:
        page = render()
    except RecordError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != page:
            print("docs/results.md is not what tools/results/ gives: run python tools/results_page.py", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
