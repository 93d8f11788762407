"""Run every ``benchmarks/bench_*.py`` in its own process, collect their ``BENCH {json}`` lines, and write
``benchmarks/results.json`` and ``benchmarks/results.md`` (the table the README shows).

A row keeps the date and CPU it was measured on; the table calls out a row whose measured code (``DEPENDS``) has a
git commit after that date, so an old figure cannot pass for a current one. ``--render`` redraws the table from
``results.json`` without running anything.

    python benchmarks/run_all.py [--render] [NAME ...]
"""

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

# The code each benchmark measures (besides the script itself): a commit touching any of it after a row's date
# makes the row stale. Paths are relative to the repository root; a folder covers everything under it.
DEPENDS: dict[str, list[str]] = {
    "bench_ad_flux_step.py": ["operators/ad", "operators/attention.py", "operators/tiny_flux.py"],
    "bench_ad_step.py": ["operators/ad", "operators/attention.py"],
    "bench_clip.py": ["operators/clip_score.py", "pipeline/filter/embed.py", "pipeline/io/tar_index.py",
                      "pipeline/io/images.py"],
    "bench_dedup_scale.py": ["pipeline/filter/dedup.py"],
    "bench_demo.py": ["pipeline", "jobs/cli.py", "jobs/console.py", "operators/color_transfer.py",
                      "operators/clip_score.py", "configs/demo.yaml"],
    "bench_filter_scale.py": ["pipeline/filter", "pipeline/session.py", "pipeline/output/record.py",
                              "pipeline/output/resume.py", "pipeline/output/store.py", "pipeline/output/sink.py",
                              "pipeline/output/tars.py", "pipeline/output/publish.py", "operators/clip_score.py"],
    "bench_gpu_feeding.py": ["pipeline", "tests/plugin_ops.py", "operators/clip_score.py"],
    "bench_memory.py": ["pipeline", "operators/color_transfer.py", "operators/clip_score.py"],
    "bench_pipeline.py": ["pipeline", "operators/color_transfer.py", "operators/clip_score.py", "operators/sissi"],
    "bench_plan_scale.py": ["pipeline/plan/keys.py", "pipeline/plan/dataset.py", "pipeline/io/sources.py",
                            "pipeline/output/resume.py", "pipeline/generate/run.py", "pipeline/session.py"],
    "bench_sissi.py": ["operators/sissi", "operators/attention.py", "operators/tiny_flux.py"],
    "bench_writer.py": ["pipeline/output/store.py", "pipeline/output/sink.py", "pipeline/output/tars.py",
                        "pipeline/output/publish.py", "pipeline/redact.py", "pipeline/io/fs.py",
                        "pipeline/io/images.py"],
}


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
    """The rows of the last results.json, each with its date and CPU (older files kept them once, at the top)."""
    try:
        record = json.loads((HERE / "results.json").read_text())
    except (OSError, ValueError):
        return []
    return [{**r, "date": r.get("date", record.get("date", "")), "cpu": r.get("cpu", record.get("machine", ""))}
            for r in record.get("results", [])]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def code_of(source: str | None) -> str | None:
    """A Python file's syntax tree without docstrings (comments never reach it); None when it does not parse."""
    import ast

    if source is None:
        return None
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def _changes_code(commit: str, paths: list[str]) -> bool:
    """Whether ``commit`` changed more than docstrings and comments of the Python files under ``paths`` (a
    citation fix in a docstring does not make a measurement stale); any other file counts as code."""
    files = (_git("diff-tree", "--no-commit-id", "--name-only", "-r", "--root", commit, "--", *paths) or "").split()
    for path in files:
        if not path.endswith(".py"):
            return True
        before, after = (code_of(_git("show", f"{rev}:{path}")) for rev in (f"{commit}^", commit))
        if before is None or before != after:  # None: added, deleted or unparsable
            return True
    return False


def code_changed(script: str) -> str | None:
    """Date (YYYY-MM-DD) of the last commit that changed the code of the benchmark or of what it measures (not
    only its docstrings or comments); None outside git."""
    paths = [f"benchmarks/{script}", *DEPENDS.get(script, [])]
    log = _git("log", "--no-merges", "--format=%H %cs", "--", *paths)
    if log is None:
        return None
    for line in log.splitlines():
        commit, date = line.split()
        if _changes_code(commit, paths):
            return date
    return None


def measured_cell(row: dict, changed: str | None, several_cpus: bool) -> str:
    """The row's date; a warning when its code changed later (dates compare as ISO strings); its CPU when rows
    of several machines share the table."""
    cell = row.get("date", "")
    if changed and cell and changed > cell:
        cell += f" (**stale: code changed {changed}**)"
    if several_cpus and row.get("cpu"):
        cell += f", {row['cpu']}"
    return cell


def render(record: dict) -> str:
    """The markdown table of ``record``: one header line with the machine(s), then a row per result."""
    results = record["results"]
    cpus = sorted({r.get("cpu") or record["machine"] for r in results})
    several = len(cpus) > 1
    head = (f"Measured on {cpus[0] if cpus else record['machine']}; last run {record['date']}." if not several
            else f"Measured on several machines ({'; '.join(cpus)}): each row names its own; last run "
                 f"{record['date']}.")
    changed = {script: code_changed(script) for script in sorted({r.get("script", "") for r in results})}
    lines = [head, "", "| benchmark | measure | ratio | target | met | figures | measured |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        figures = ", ".join(f"{k}={v}" for k, v in r["figures"].items())
        lines.append(f"| {r['name']} | {r['what']} | {r['ratio']} | {r['target']} | "
                     f"{'yes' if r['ok'] else 'no'} | {figures} | "
                     f"{measured_cell(r, changed.get(r.get('script', '')), several)} |")
    return "\n".join(lines) + "\n"


def publish(record: dict) -> str:
    table = render(record)
    (HERE / "results.md").write_text(table)
    update_readme(table)
    return table


def main(selected: list[str]) -> int:
    if selected[:1] == ["--render"]:
        record = json.loads((HERE / "results.json").read_text())
        record["results"] = _previous()
        print(publish(record))
        return 0
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
            r["cpu"] = machine()
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
    print(publish(record))
    if failures:
        print("benchmarks that failed to report:", ", ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
