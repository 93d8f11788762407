"""The bench table calls out rows older than the code they measure, and names each row's CPU when machines mix."""

from benchmarks.run_all import code_changed, code_of, measured_cell, render


def test_a_row_older_than_its_code_is_called_stale():
    row = {"date": "2026-11-22", "cpu": "2 cores, Intel"}
    assert measured_cell(row, "2026-12-01", False) == "2026-11-22 (**stale: code changed 2026-12-01**)"
    assert measured_cell(row, "2026-11-22", False) == "2026-11-22"
    assert measured_cell(row, None, True) == "2026-11-22, 2 cores, Intel"


def test_rows_of_two_machines_say_so_in_the_header():
    row = {"name": "n", "what": "w", "ratio": 1.0, "target": ">= 0.9", "ok": True, "figures": {}, "date": "2999-01-01",
           "script": "bench_pipeline.py"}
    table = render({"machine": "A", "date": "2999-01-01", "results": [{**row, "cpu": "A"}, {**row, "cpu": "B"}]})
    assert table.startswith("Measured on several machines (A; B)")
    assert "2999-01-01, B |" in table and "stale" not in table


def test_the_pipeline_bench_depends_on_committed_code():
    assert code_changed("bench_pipeline.py") is not None


def test_docstrings_and_comments_are_not_code():
    """A commit that only fixes docstrings or comments (e.g. a citation) does not make a row stale."""
    code = 'def f(x):\n    """Doc."""\n    return x + 1  # one\n'
    assert code_of(code) == code_of('def f(x):\n    """Other doc (docs/architecture.md §8)."""\n    return x + 1\n')
    assert code_of(code) != code_of('def f(x):\n    """Doc."""\n    return x + 2\n')
    assert code_of(code) == code_of('def f(x):\n    return x + 1\n')


def test_every_benchmark_names_the_code_it_measures():
    """A benchmark missing from ``DEPENDS`` could never be called stale (e.g. ``bench_gpu_feeding.py``)."""
    from benchmarks.run_all import DEPENDS, HERE

    assert sorted(p.name for p in HERE.glob("bench_*.py")) == sorted(DEPENDS)
