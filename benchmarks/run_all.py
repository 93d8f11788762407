"""Run every ``benchmarks/bench_*.py`` in its own process, collect their ``BENCH {json}`` lines, and write
``benchmarks/results.json`` and ``benchmarks/results.md`` (the table the README shows)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def update_readme(table: str) -> None:
    """Replace the table between the bench-table markers in README.md."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- bench-table -->\n", "<!-- /bench-table -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        readme.write_text(head + start + table + rest[rest.index(end):])


def _previous() -> list[dict]:
    try:
        record = json.loads((HERE / "results.json").read_text())
    except (OSError, ValueError):
        return []
    return [{**r, "date": r.get("date", record.get("date", ""))} for r in record.get("results", [])]


def main(selected: list[str]) -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if selected:
        scripts = [s for s in scripts if any(name in s.name for name in selected)]
    results, failures = [], []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True,
                              timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)})
        found = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
        for r in found:
            r["script"] = script.name
            r["seconds"] = round(time.time() - t0, 1)
            r["date"] = time.strftime("%Y-%m-%d")
        results.extend(found)
        if proc.returncode != 0 or not found:
            failures.append(script.name)
            print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
    if selected:  # a partial run replaces the rows of the scripts it ran and keeps the others
        ran = {s.name for s in scripts}
        results = [r for r in _previous() if r.get("script") not in ran] + results
        results.sort(key=lambda r: r["name"])
    record = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "results": results, "failed": failures}
    (HERE / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"Measured on {record['machine']}; last run {record['date']}.", "",
             "| benchmark | measure | ratio | target | met | figures | measured |", "|---|---|---|---|---|---|---|"]
    for r in results:
        figures = ", ".join(f"{k}={v}" for k, v in r["figures"].items())
        lines.append(f"| {r['name']} | {r['what']} | {r['ratio']} | {r['target']} | "
                     f"{'yes' if r['ok'] else 'no'} | {figures} | {r.get('date', '')} |")
    table = "\n".join(lines) + "\n"
    (HERE / "results.md").write_text(table)
    update_readme(table)
    print(table)
    if failures:
        print("benchmarks that failed to report:", ", ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
