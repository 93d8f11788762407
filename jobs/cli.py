"""The ``stylegen`` command line (docs/architecture.md §3).

User errors (bad config, unreadable source) print one line ``error: ...`` on stderr and exit 2; a finished
run exits 0 and prints ``planned=N kept=K rejected=R failed=F skipped=S`` as its last line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Generate stylized image corpora: plan, stylize, score, filter, shard.")
models_app = typer.Typer(no_args_is_help=True, help="Model utilities.")
app.add_typer(models_app, name="models")

EXIT_USAGE = 2

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: dotted.key=value")]


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    from pipeline.redact import redact_text

    typer.echo(f"error: {redact_text(message)}", err=True)  # no URL credential or secret value on the console
    raise typer.Exit(code)


def _load(config: Path, overrides: list[str] | None, schema=None):
    from pipeline.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [], schema=schema)
    except ConfigError as exc:
        _fail(str(exc))


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError at the root of ``exc`` (Ray wraps a task's exception as ``.cause``), if there is one."""
    from pipeline.errors import exception_chain

    found = None
    for err in exception_chain(exc):
        if isinstance(err, OSError) and (err.errno is not None or err.filename):
            found = err
    return found


def _unexpected(exc: Exception, debug: bool, output: str = "") -> None:
    """Anything else that stops a run: one line and exit 1; ``--debug`` shows the traceback instead. An OSError
    (disk full, permission, quota) reads ``error: <path>: <strerror>``."""
    if debug:
        raise exc
    os_error = _os_error(exc)
    if os_error is not None:
        path = os_error.filename or output
        # Ray Data re-raises a task's OSError with its own text as strerror: the errno is what to trust
        text = os.strerror(os_error.errno) if os_error.errno else os_error.strerror or str(os_error)
        _fail(f"{path}: {text}" if path else text, code=1)
    first = (str(exc).strip().splitlines() or [""])[0][:500]
    _fail(f"run failed: {exc.__class__.__name__}: {first} (rerun with --debug for the traceback)", code=1)


class Stopped(BaseException):
    """SIGTERM or SIGINT: unwinds the run (Ray shut down, lease released) like KeyboardInterrupt does."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_RECEIVED: list[int] = []


def _on_signal(signum, frame) -> None:
    # Raised wherever the main thread is; inside C code it may come back wrapped (SystemError), so the signal
    # is also remembered here for _execute to recognise the stop.
    _RECEIVED.append(signum)
    raise Stopped(signum)


def _stopped(signum: int) -> None:
    import signal

    _fail(f"stopped by {signal.Signals(signum).name}; rerun the same command to resume", code=128 + signum)


def _stop_cleanly() -> None:
    """Turn SIGTERM and SIGINT into :class:`Stopped` for the duration of a run (the main thread only)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)


def _check_sources(config: Path, cfg) -> int:
    """Planned samples of a run config (the plan) or a filter config (the samples of its input tars, counted one
    tar at a time); an unreadable source exits 2."""
    from pipeline.io.sources import SourceError
    from pipeline.output.ownership import check_overlap

    try:
        if getattr(cfg, "kind", "run") == "filter":
            check_overlap(cfg.output.path, [("input.shards", cfg.input.shards)])
            from pipeline.filter.inputs import index_tars, list_inputs

            return sum(len(index_tars([job])) for job in list_inputs(cfg))
        from pipeline.generate.run import source_specs
        from pipeline.plan.keys import build_plan

        check_overlap(cfg.output.path, source_specs(cfg))
        return len(build_plan(cfg))
    except SourceError as exc:
        _fail(f"{config}: {exc}")
    return 0


@app.command()
def validate(config: Path, set_: SetOpt = None) -> None:
    """Check a config (run or filter, told apart by its keys or `kind: filter`) and its sources without running
    anything."""
    cfg = _load(config, set_, schema="auto")
    planned = _check_sources(config, cfg)
    typer.echo(f"ok: {config} is a valid {getattr(cfg, 'kind', 'run')} config; planned={planned}")


AddressArg = Annotated[str | None, typer.Option(help="Ray address; default: embedded local Ray")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print the summary line alone (errors still on stderr)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object (for scripts)")]
DebugOpt = Annotated[bool, typer.Option(help="Show tracebacks")]


def _summary_json(summary) -> str:
    import dataclasses
    import json

    return json.dumps(dataclasses.asdict(summary) if dataclasses.is_dataclass(summary) else vars(summary),
                      sort_keys=True, default=str)


def _execute(config: Path, cfg, job, address: str | None, quiet: bool, debug: bool,
             retry_failed: str | None = None, writes: bool = True, as_json: bool = False) -> None:
    """Shared by `run`, `plan` and `filter`: the console (jobs/console.py), the output check, the writer lease,
    one-line errors, a clean stop on SIGTERM/SIGINT (exit 143/130), the summary last (one JSON object with
    ``--json``)."""
    from jobs.console import CoreLinesOff, setup_logging
    from pipeline.config import ConfigError
    from pipeline.generate.failures import RunStopped
    from pipeline.io.sources import SourceError, check_output
    from pipeline.output.lease import LeaseHeld
    from pipeline.output.ownership import check_owned
    from pipeline.output.store import StoreUnavailable
    from pipeline.stall import Stalled

    setup_logging(quiet, debug)
    _stop_cleanly()
    try:
        if writes:
            check_owned(cfg.output.path)  # before the S3 write probe: a folder stylegen did not make stays untouched
            check_output(cfg.output.path)
        with contextlib.nullcontext() if debug else CoreLinesOff():
            summary = job(cfg, address=address, quiet=quiet, retry_failed=retry_failed)
    except (SourceError, ConfigError) as exc:
        if debug:
            raise
        _fail(f"{config}: {exc}")
    except LeaseHeld as exc:
        _fail(str(exc))
    except (StoreUnavailable, Stalled) as exc:
        _fail(str(exc), code=1)
    except RunStopped as exc:  # a failure storm or a device that kept dying: the cause, and how to resume
        if debug:
            raise
        again = f"stylegen run {config}" + (" --retry-failed" if exc.retry_failed else "")
        _fail(f"{exc}; fix it, then resume with `{again}`", code=1)
    except Stopped as exc:
        _stopped(exc.signum)
    except Exception as exc:
        if _RECEIVED and not debug:
            _stopped(_RECEIVED[0])
        _unexpected(exc, debug, cfg.output.path)
    typer.echo(_summary_json(summary) if as_json else summary.line())


def optional_values(args: list[str], bare: dict[str, str], choices: dict[str, tuple[str, ...]],
                     takes_value: set[str]) -> list[str]:
    """Rewrite options whose value is optional to ``--opt=value`` before click parses them, so that a bare
    ``--opt`` never takes the next option (or the config) as its value. ``bare`` maps each such option to its
    value when given alone; a value must be attached with ``=``, except one of ``choices[opt]`` (a closed set)
    may also follow it. The value of another option and everything after ``--`` are left alone."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return out + args[i:]
        if arg in bare:
            following = args[i + 1] if i + 1 < len(args) else None
            if following is not None and following in choices.get(arg, ()):
                out.append(f"{arg}={following}")
                i += 2
                continue
            out.append(f"{arg}={bare[arg]}")
        elif arg in takes_value and i + 1 < len(args):
            out += args[i:i + 2]
            i += 2
            continue
        else:
            out.append(arg)
        i += 1
    return out


class OptionalValueCommand(TyperCommand):
    """A command with options whose value is optional (``BARE``: option -> value when given alone; ``CHOICES``:
    values that may follow without ``=``)."""

    BARE: dict[str, str] = {}
    CHOICES: dict[str, tuple[str, ...]] = {}

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        takes_value = {opt for p in self.get_params(ctx) if p.param_type_name == "option"
                       and not getattr(p, "is_flag", False) and not getattr(p, "count", False) for opt in p.opts}
        return super().parse_args(ctx, optional_values(args, self.BARE, self.CHOICES, takes_value - set(self.BARE)))


class RetryCommand(OptionalValueCommand):
    BARE = {"--retry-failed": ""}


RetryOpt = Annotated[str | None, typer.Option(
    "--retry-failed", metavar="[=SUBSTRING]", show_default=False,
    help="Re-plan failed samples: all of them, or with --retry-failed=SUBSTRING only those whose reason contains "
         "SUBSTRING (the value needs the '=')")]
RetryReasonOpt = Annotated[str | None, typer.Option(
    "--retry-reason", metavar="SUBSTRING",
    help="Re-plan only the failed samples whose reason contains SUBSTRING (implies --retry-failed)")]


def _retry(retry_failed: str | None, retry_reason: str | None) -> str | None:
    """What to retry (None: nothing, "": every failed sample, text: reasons containing it), from both options."""
    if retry_reason is None:
        return retry_failed
    if retry_failed not in (None, "", retry_reason):
        _fail(f"--retry-failed={retry_failed} and --retry-reason {retry_reason}: give the reason once")
    return retry_reason


@app.command(cls=RetryCommand)
def run(config: Path, set_: SetOpt = None, address: AddressArg = None, quiet: QuietOpt = False,
        debug: DebugOpt = False, retry_failed: RetryOpt = None, retry_reason: RetryReasonOpt = None,
        json_: JsonOpt = False) -> None:
    """Run (or resume) a generation job."""
    from pipeline.generate.run import run as run_job

    _execute(config, _load(config, set_), run_job, address, quiet, debug, _retry(retry_failed, retry_reason),
             as_json=json_)


@app.command("plan")
def plan_cmd(config: Path, set_: SetOpt = None, address: AddressArg = None,
             out: Annotated[str | None, typer.Option(help="Write the plan as parquet under this new folder "
                                                          "(local or s3://)")] = None,
             quiet: QuietOpt = False, debug: DebugOpt = False, json_: JsonOpt = False) -> None:
    """Build the plan on Ray and print planned=N todo=M (todo: not yet in the output's index); writes nothing
    under the output."""
    import functools

    from pipeline.generate.run import plan_only

    _execute(config, _load(config, set_), functools.partial(plan_only, out=out), address, quiet, debug,
             writes=False, as_json=json_)


@app.command("filter", cls=RetryCommand)
def filter_(config: Path, set_: SetOpt = None, address: AddressArg = None, quiet: QuietOpt = False,
            debug: DebugOpt = False, retry_failed: RetryOpt = None, retry_reason: RetryReasonOpt = None,
            json_: JsonOpt = False) -> None:
    """CLIP quality filtering of existing WebDataset shards (run or resume)."""
    from pipeline.config import FilterRunConfig
    from pipeline.filter.run import curate

    _execute(config, _load(config, set_, schema=FilterRunConfig), curate, address, quiet, debug,
             _retry(retry_failed, retry_reason), as_json=json_)


@app.command()
def verify(
    output: Annotated[str, typer.Argument(help="Output path or s3:// URL")],
    repair: Annotated[bool, typer.Option("--repair", help="Move damaged files to OUTPUT/_quarantine/")] = False,
    lease_ttl_s: Annotated[float, typer.Option(help="S3 lease TTL while repairing")] = 120.0,
) -> None:
    """Check the output contract; list every problem with its file. Exit 0 when clean (after --repair: when
    nothing is left to repair), 1 otherwise."""
    from pipeline.output.integrity import check
    from pipeline.output.integrity import repair as quarantine
    from pipeline.output.lease import Lease, LeaseHeld
    from pipeline.output.ownership import NotOurs, check_owned, claim
    from pipeline.output.store import OutputStore, StoreUnavailable

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    store = OutputStore(output)
    if not store.fs.exists(store.index) and not store.fs.exists(store.shards):
        _fail(f"{output}: not a stylegen output (no index/ or shards/)")
    try:
        if repair:  # moves files: only in an output stylegen made, and never through a link
            check_owned(output)
            claim(output, "filter" if (store.read_json("run.json") or {}).get("kind") == "filter" else "run")
        lease = Lease(output, ttl_s=lease_ttl_s).acquire() if repair else None
    except (LeaseHeld, NotOurs) as exc:
        _fail(str(exc))
    try:
        problems = check(store, deep=True)
        for problem in problems:
            typer.echo(problem.line())
        if repair and problems:
            moved = quarantine(store, problems)
            typer.echo(f"repaired: moved {len(moved)} files to {store.url}/_quarantine/; "
                       "the next run redoes their samples")
            problems = check(store, deep=True)
            for problem in problems:
                typer.echo(f"still: {problem.line()}")
    except StoreUnavailable as exc:  # the store did not answer: nothing is damaged, nothing was moved
        _fail(str(exc), code=1)
    finally:
        if lease is not None:
            lease.release()
    rows = len(store.read_index(["key"], skip_damaged=True))
    typer.echo(f"{'ok' if not problems else 'problems'}: {len(problems)} problems, {rows} index rows in {output}")
    raise typer.Exit(1 if problems else 0)


AddressOpt = Annotated[str, typer.Option(help="Ray dashboard address, e.g. http://HEAD:8265")]


def _jobs_error(address: str, exc: Exception) -> tuple[str, int]:
    """The one line (and exit code) for what the Ray Jobs client raised: authentication, connection, an error
    answer of the Jobs API, anything else."""
    from ray.exceptions import AuthenticationError

    first = (str(getattr(exc, "message", "") or exc).strip().splitlines() or [""])[0][:500]
    if isinstance(exc, AuthenticationError):
        path = os.environ.get("RAY_AUTH_TOKEN_PATH")
        hint = (f"RAY_AUTH_TOKEN_PATH={path} is not a file" if path and not os.path.isfile(path) else
                "export the cluster's token as RAY_AUTH_TOKEN, or its file as RAY_AUTH_TOKEN_PATH")
        return f"Ray at {address}: {first} ({hint})", EXIT_USAGE
    if isinstance(exc, (ConnectionError, OSError)):
        return f"cannot reach Ray at {address}: {first}", EXIT_USAGE
    if isinstance(exc, RuntimeError):  # the Jobs API answered with an error (unknown job id, ...)
        return f"Ray at {address}: {first}", 1
    return f"Ray at {address}: {exc.__class__.__name__}: {first} (rerun with --debug for the traceback)", 1


@contextlib.contextmanager
def _jobs_api(address: str, debug: bool):
    """Token auth set up before Ray reads its settings, and one line ``error: ...`` for a failure of the Jobs API
    (``--debug``: the traceback)."""
    from jobs.auth import enable_token_auth

    enable_token_auth()
    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:
        if debug:
            raise
        _fail(*_jobs_error(address, exc))


class SubmitCommand(OptionalValueCommand):
    BARE = {"--ship-deps": "pip"}
    CHOICES = {"--ship-deps": ("pip", "uv")}


@app.command(cls=SubmitCommand)
def submit(
    config: Path,
    address: AddressOpt,
    set_: SetOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Stream logs; exit non-zero if the job fails")] = False,
    ship_deps: Annotated[str | None, typer.Option(
        "--ship-deps", metavar="[pip|uv]", show_default=False,
        help="Install the tested set (requirements.lock) for the job (Ray runtime_env pip, or uv); alone: pip")] = None,
    debug: DebugOpt = False,
) -> None:
    """Submit a run or filter config to a Ray cluster as a job (idempotent: the same run attaches to its job)."""
    from jobs.auth import enable_token_auth

    enable_token_auth()  # before the config's modules import Ray
    from jobs import submit as jobs
    from pipeline.config import ConfigError

    cfg = _load(config, set_, schema="auto")
    _check_sources(config, cfg)
    with _jobs_api(address, debug):
        try:
            job_id, new = jobs.submit(cfg, address, ship_deps=ship_deps)
        except ConfigError as exc:
            _fail(f"{config}: {exc}")
        except RuntimeError as exc:  # the Jobs API answered with an error
            _fail(f"Ray at {address} refused the job: {str(exc).splitlines()[0]}", code=1)
        typer.echo(f"{'submitted' if new else 'already submitted'}: {job_id}")
        if wait:
            final = jobs.wait(address, job_id)
            typer.echo(f"job {job_id}: {final}")
            if final != "SUCCEEDED":
                raise typer.Exit(1)


def _is_output(target: str) -> bool:
    """An output path or URL, not a Ray job id (job ids have neither a "/" nor a "://")."""
    return "://" in target or "/" in target or os.path.exists(target)


def _exists(url: str) -> bool:
    """Whether this machine can see the output at ``url`` (a local folder, a shared disk, s3://)."""
    from pipeline.io.fs import get_fs

    fs, root = get_fs(url)
    return fs.exists(root)


@app.command()
def status(job_id: Annotated[str, typer.Argument(metavar="JOB_OR_OUTPUT",
                                                 help="A submitted job's id, or an output path or s3:// URL")],
           address: Annotated[str | None, typer.Option(help="Ray dashboard address, e.g. http://HEAD:8265 (for a "
                                                         "job)")] = None,
           debug: DebugOpt = False, json_: JsonOpt = False) -> None:
    """How far a job is: a submitted job's state, or an output's counts, rate and ETA (read from its files, without
    taking its lease: a local run in another terminal, a job's output, an S3 output)."""
    if _is_output(job_id):
        import json

        from pipeline.review.status import output_status

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        if not _exists(job_id):
            _fail(f"{job_id}: not found")
        found = output_status(job_id)
        typer.echo(json.dumps(found.__dict__, sort_keys=True, default=str) if json_ else found.line())
        return
    if not address:
        _fail(f"{job_id}: a job's status needs --address (the Ray dashboard); an output's needs its path or URL")
    with _jobs_api(address, debug):
        from jobs import submit as jobs

        info = jobs.status(address, job_id)
    typer.echo(f"{info['job_id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
    if info.get("output"):  # how far: from the job's output, when this machine can read it (s3://, shared disk)
        from pipeline.review.status import output_status

        try:
            if _exists(info["output"]):
                typer.echo(output_status(info["output"]).line())
                return
        except Exception as exc:  # the job's state above is the answer; its output is a bonus
            logging.getLogger(__name__).debug("status of %s: %s", info["output"], exc)
        typer.echo(f"{info['output']}: not readable from this machine (`stylegen status OUTPUT` where it is)")


@app.command()
def logs(job_id: str, address: AddressOpt, debug: DebugOpt = False) -> None:
    """Print a job's logs."""
    with _jobs_api(address, debug):
        from jobs import submit as jobs

        text = jobs.logs(address, job_id)
    typer.echo(text, nl=False)


@app.command()
def stop(job_id: str, address: AddressOpt, debug: DebugOpt = False) -> None:
    """Stop a running job (rerunning the same config later resumes it)."""
    with _jobs_api(address, debug):
        from jobs import submit as jobs

        stopped = jobs.stop(address, job_id)
    typer.echo(f"{job_id}: {'stop requested' if stopped else 'not running'}")


@app.command()
def report(
    output: Annotated[str, typer.Argument(help="Output path or s3:// URL of a run (finished or partial)")],
    out: Annotated[str | None, typer.Option("--out", help="Report folder; default OUTPUT/report or ./report")] = None,
    samples: Annotated[int, typer.Option(help="Kept samples on the contact sheet")] = 24,
) -> None:
    """Write a self-contained HTML report (counts, contact sheet, score histograms, worst/best, config)."""
    from pipeline.review.report import make_report

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = make_report(output, out, max_samples=samples)
    if not result.counts and not result.sheet_samples:
        typer.echo(f"warning: no index rows in {output}", err=True)
    typer.echo(f"report: {result.html}")


@app.command()
def reproduce(
    output: Annotated[str, typer.Argument(help="Output path or s3:// URL of a run")],
    key: Annotated[str, typer.Argument(help="Sample key")],
    config: Annotated[Path | None, typer.Option(help="The run's config when OUTPUT has no run.json")] = None,
    device: Annotated[str | None, typer.Option(help="Device; default: the recorded one if present, else cpu")] = None,
    save: Annotated[Path | None, typer.Option(help="Also write the regenerated image here")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads; default: the stylize actors' num_cpus")] = None,
) -> None:
    """Regenerate one sample from its recorded settings; exit 0 if identical, 1 if different, 2 if unknown."""
    from pipeline.review.reproduce import NotReproducible, UnknownKey
    from pipeline.review.reproduce import reproduce as regenerate

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = _load(config, None) if config else None
    try:
        result = regenerate(output, key, config=cfg, device=device, threads=threads)
    except (UnknownKey, NotReproducible) as exc:
        _fail(str(exc))
    if save:
        result.image.save(save)
    typer.echo(result.line())
    raise typer.Exit(0 if result.identical else 1)


@models_app.command("tiny")
def models_tiny(
    kind: Annotated[str, typer.Argument(help="flux | flux-fill | sd15 | sdxl | clip")],
    out_dir: Path,
    seed: Annotated[int, typer.Option(help="Seed of the random weights")] = 0,
) -> None:
    """Write a tiny random-weight model of KIND (real architecture) to OUT_DIR, offline."""
    from operators.models import save_tiny, tiny_kinds

    if kind not in tiny_kinds():
        _fail(f"unknown tiny model kind {kind!r}; known: {', '.join(tiny_kinds())}")
    save_tiny(kind, out_dir, seed=seed)
    typer.echo(f"wrote tiny {kind} model to {out_dir}")


@models_app.command("convert-head")
def models_convert_head(
    src: Annotated[Path, typer.Argument(help="Published state dict (.pth), loaded with weights_only=True")],
    out: Annotated[Path, typer.Argument(help="Head file to write (.safetensors, config in its metadata)")],
    layout: Annotated[str, typer.Option(help="auto | aesthetic | nsfw | linear")] = "auto",
    activation: Annotated[str | None, typer.Option(help="Override: none | relu | gelu")] = None,
    output: Annotated[str | None, typer.Option(help="Override: identity | sigmoid")] = None,
) -> None:
    """Convert a quality head's .pth state dict (LAION aesthetic predictor, NSFW detector, any linear/MLP) to
    safetensors for scoring.heads; tensors only, no code is unpickled."""
    from operators.heads import HeadError, convert_head

    if out.suffix != ".safetensors":
        _fail(f"{out}: the output must end in .safetensors")
    try:
        head = convert_head(src, out, layout=layout, activation=activation, output=output)
    except HeadError as exc:
        _fail(str(exc))
    spec = head.spec
    typer.echo(f"wrote head to {out}: {spec.input_dim} -> {' -> '.join(map(str, spec.layers))}, "
               f"activation {spec.activation}, output {spec.output}, standardize {str(spec.standardize).lower()}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
