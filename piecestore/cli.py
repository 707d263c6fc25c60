"""The ``piecestore`` command: pieces in and out of a store, its profile, GC, fsck and a demo.

Why exit codes are a contract: scripts branch on them, so each piecestore error class maps
to one code (see ``EXIT_CODES``), unexpected failures never reuse the "not found" code, and
errors print as one line on stderr (tracebacks only with ``--debug``). Output that is data has
``--json``; progress goes to stderr and only when stderr is a terminal, so pipes stay clean.
Secrets never reach the output: settings are shown through ``Settings.redacted()`` and URLs
through the router's secret stripping.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import random
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, NoReturn, TypeVar, cast

import typer

from piecestore.errors import (
    BackendUnavailableError,
    ConfigError,
    CorruptionError,
    InvalidKeyError,
    InvalidValueError,
    NotFoundError,
    PermissionDeniedError,
    PieceStoreError,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from piecestore.settings import Settings

# -- exit codes -------------------------------------------------------------------------------

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_CORRUPT = 3
EXIT_UNAVAILABLE = 4
EXIT_ERROR = 5
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "ok",
    EXIT_NOT_FOUND: "piece or object not found",
    EXIT_USAGE: "usage or configuration error (bad option, URL, key or setting)",
    EXIT_CORRUPT: "corruption found (fsck, or a checksum failed on read)",
    EXIT_UNAVAILABLE: "backend unavailable, or permission denied / read-only",
    EXIT_ERROR: "any other piecestore error",
}
EPILOG = "[b]Exit codes:[/b] " + "; ".join(f"{code} {text}" for code, text in EXIT_CODES.items()) + "."


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code of an exception (order matters: subclasses first)."""
    if isinstance(exc, CorruptionError):
        return EXIT_CORRUPT
    if isinstance(exc, NotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, ConfigError | InvalidKeyError | InvalidValueError):
        return EXIT_USAGE
    if isinstance(exc, BackendUnavailableError | PermissionDeniedError):
        return EXIT_UNAVAILABLE
    return EXIT_ERROR


# -- the app ----------------------------------------------------------------------------------

app = typer.Typer(
    name="piecestore",
    help="Keep pieces (blobs named by string keys) on any object store.\n\n"
    "The store comes from --store URL, else the settings (PIECESTORE_STORE__URL, BUCKET_URL, "
    "config.toml), else ./piecestore-data.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    # Rich tracebacks print local variables, which may hold credentials.
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show the settings in effect.", no_args_is_help=True, epilog=EPILOG)
app.add_typer(config_app, name="config")

StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        "-s",
        metavar="URL",
        help="store URL (memory://, file://, s3://, minio:// or a path); default: from the settings",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        metavar="FILE",
        help="config file; default $PIECESTORE_CONFIG, else ./config.toml if present",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON on stdout")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks of errors")]

F = TypeVar("F", bound=Callable[..., Any])


def _command(target: typer.Typer, name: str, **kwargs: Any) -> Callable[[F], F]:
    """Register a command whose errors become one stderr line and a documented exit code."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            # Options given before the command (`piecestore -s URL ls`) apply unless repeated after it.
            for opt in ("store", "config"):
                if opt in kw and kw[opt] is None:
                    kw[opt] = _GLOBAL.get(opt)
            if "debug" in kw:
                kw["debug"] = bool(kw["debug"] or _GLOBAL.get("debug"))
            debug = bool(kw.get("debug", False) or _GLOBAL.get("debug"))
            try:
                return fn(*args, **kw)
            except typer.Exit:
                raise
            except PieceStoreError as e:
                _report(e, exit_code_for(e), debug)
            except KeyboardInterrupt:
                typer.echo("piecestore: interrupted", err=True)
                raise typer.Exit(EXIT_INTERRUPTED) from None
            except BrokenPipeError:
                # `piecestore ls | head`: the reader left; that is not an error of ours.
                with contextlib.suppress(OSError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                raise typer.Exit(EXIT_OK) from None
            except OSError as e:  # local files: -o FILE, put FILE
                _report(e, EXIT_ERROR, debug)
            except Exception as e:  # a bug: never exit 1, which scripts read as "not found"
                _report(e, EXIT_ERROR, debug, prefix="internal error: ")

        target.command(name, epilog=EPILOG, **kwargs)(wrapper)
        return fn

    return decorate


def _report(exc: BaseException, code: int, debug: bool, prefix: str = "") -> NoReturn:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    kind = type(exc).__name__
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or kind
    message = message.replace("keyword argument store_url", "--store")
    typer.echo(f"piecestore: error: {prefix}{kind}: {message}", err=True)
    raise typer.Exit(code)


def _fail(code: int, message: str) -> NoReturn:
    typer.echo(f"piecestore: error: {message}", err=True)
    raise typer.Exit(code)


# The root options of this invocation; the root callback resets them before any command runs.
_GLOBAL: dict[str, Any] = {}


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    store: StoreOpt = None,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
    version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False,
) -> None:
    _GLOBAL.clear()
    _GLOBAL.update(store=store, config=config, debug=debug)
    if version:
        from piecestore import __version__

        typer.echo(f"piecestore {__version__}")
        raise typer.Exit(EXIT_OK)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(EXIT_USAGE)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="piecestore")


# -- opening the store ------------------------------------------------------------------------


def default_store_url() -> str:
    """The library's default store, as a path the file driver accepts from any directory."""
    from piecestore.api import DEFAULT_URL

    # file://./x names host "."; the file driver wants relative paths written plainly.
    if DEFAULT_URL.startswith("file://./"):
        return DEFAULT_URL[len("file://") :]
    return DEFAULT_URL


def load_cli_settings(url: str | None, config: Path | None, **overrides: Any) -> Settings:
    """Settings as the library loads them, with --store winning over any configured sharding."""
    from piecestore.settings import load_settings

    if url is not None:
        overrides["store_url"] = url
        if "{shard" not in url:  # an explicit single store: configured shards do not apply
            overrides.update(
                sharding_targets=[], sharding_shards=0, sharding_weights=[], sharding_template=""
            )
    config_file = None if config is None else str(config)
    settings = load_settings(config_file=config_file, **overrides)
    if not settings.store.url and not (settings.sharding.targets or settings.sharding.shards):
        settings = load_settings(config_file=config_file, **{**overrides, "store_url": default_store_url()})
    return settings


@contextlib.contextmanager
def open_store(
    url: str | None, config: Path | None, *, read_only: bool = False, **overrides: Any
) -> Iterator[Any]:
    """Open the store the options and settings name; read-only commands never create or write.

    A sharded store is not forced read-only: opening it may have to finish recording its layout,
    and a target missing from the recorded layout must surface as the layout mismatch it is.
    """
    from piecestore.api import open_with_settings

    settings = load_cli_settings(url, config, **overrides)
    sharded = bool(settings.sharding.targets or settings.sharding.shards)
    if read_only and not sharded and not settings.store.read_only:
        settings = load_cli_settings(url, config, **overrides, store_read_only=True)
    store = open_with_settings(settings)
    try:
        yield store
    finally:
        store.close()


def safe_url(url: str) -> str:
    """A URL fit to print: no userinfo, no credential-like query parameters."""
    from piecestore.sharding.router import strip_url_secrets

    try:
        return strip_url_secrets(url)
    except ConfigError:
        return "<unparseable URL>"


def mask_url(url: str) -> str:
    """A URL for display: the password and credential-like query values replaced by ***.

    Settings.redacted() masks passwords; this also covers a secret pasted into the query, which
    the drivers refuse to use but ``config show`` would otherwise echo.
    """
    from urllib.parse import urlsplit, urlunsplit

    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password:
            netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
        params = []
        for param in parts.query.split("&") if parts.query else []:
            name, sep, _ = param.partition("=")
            # The router's own test of what counts as a credential, applied to this one parameter.
            secret = sep and safe_url(f"x://h/?{param}") == "x://h/"
            params.append(f"{name}=***" if secret else param)
        return urlunsplit(parts._replace(netloc=netloc, query="&".join(params)))
    except ValueError:
        return "<unparseable URL>"


# -- output helpers ---------------------------------------------------------------------------


def _out() -> Console:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False)


def _err() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _to_json(report: Any) -> Any:
    if hasattr(report, "to_json"):
        return report.to_json()
    import dataclasses

    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        return dataclasses.asdict(report)
    return report


def _show_report(report: Any, as_json: bool) -> None:
    """Reports from gc/fsck/bench/check/reshard: their JSON, else their render() or str()."""
    if as_json:
        _print_json(_to_json(report))
    elif hasattr(report, "render"):
        _out().print(report.render())
    elif hasattr(report, "render_table"):  # the bench package's results
        console = _out()
        console.print(report.render_table())
        if hasattr(report, "render_headline"):
            console.print(report.render_headline())
    elif "__str__" not in vars(type(report)) and isinstance(_to_json(report), dict):
        # A plain dataclass (e.g. ReshardReport): one "field  value" line each.
        for name, value in _to_json(report).items():
            typer.echo(f"{name:<16} {value}")
    else:
        typer.echo(str(report))


def _report_ok(report: Any) -> bool:
    ok = getattr(report, "ok", None)
    if ok is not None:
        return bool(ok)
    data = _to_json(report)
    if isinstance(data, dict):
        if "ok" in data:
            return bool(data["ok"])
        return not (data.get("problems") or data.get("errors") or data.get("failures"))
    return True


@contextlib.contextmanager
def _progress(enabled: bool = True) -> Iterator[Progress]:
    """Progress bars on stderr, shown only on a terminal (a disabled Progress still accepts calls)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    console = _err()
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    ) as progress:
        yield progress


class _Hook:
    """Adapts engine progress callbacks, ``(done, total)`` or ``(phase, done, total)``, to bars."""

    def __init__(self, progress: Progress, label: str) -> None:
        self._progress = progress
        self._label = label
        self._tasks: dict[str, TaskID] = {}
        self._lock = threading.Lock()

    def __call__(self, *args: Any) -> None:
        label = self._label
        if args and isinstance(args[0], str):
            label = f"{self._label}: {args[0]}"
            args = args[1:]
        done = int(args[0]) if args else 0
        total = int(args[1]) if len(args) > 1 and args[1] is not None else None
        with self._lock:
            task = self._tasks.get(label)
            if task is None:
                task = self._tasks[label] = self._progress.add_task(label, total=total)
        self._progress.update(task, completed=done, total=total)


def _call_with_progress(fn: Callable[..., Any], hook: _Hook, *args: Any, **kwargs: Any) -> Any:
    """Pass ``progress=hook`` only to functions that take it (sharded and plain stores differ)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if "progress" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs["progress"] = hook
    return fn(*args, **kwargs)


def _require(obj: Any, method: str, what: str) -> Callable[..., Any]:
    fn = getattr(obj, method, None)
    if not callable(fn):
        _fail(EXIT_ERROR, f"{what} is not available for {type(obj).__name__} in this piecestore build")
    return cast("Callable[..., Any]", fn)


def _info_json(info: Any) -> dict[str, Any]:
    return {
        "key": info.key,
        "size": info.size,
        "checksum": None if info.checksum is None else f"{info.checksum:016x}",
        "table": info.table,
        "external": info.external,
    }


def _write_atomically(path: Path, chunks: Iterable[bytes]) -> None:
    """Write to a temp file beside ``path`` and rename: a failed read never leaves half a file."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _stdout_bytes() -> BinaryIO:
    return typer.get_binary_stream("stdout")


# -- piece commands ---------------------------------------------------------------------------


class _CountingReader:
    """A binary reader that moves a progress bar as the store consumes it."""

    def __init__(self, raw: BinaryIO, progress: Progress, task: TaskID) -> None:
        self._raw = raw
        self._progress = progress
        self._task = task

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._progress.advance(self._task, len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)


@_command(app, "put")
def put_cmd(
    key: Annotated[str, typer.Argument(metavar="KEY", help="piece key")],
    file: Annotated[str, typer.Argument(metavar="[FILE|-]", help="file to store; - or absent: stdin")] = "-",
    store: StoreOpt = None,
    config: ConfigOpt = None,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Store one piece from a file or stdin (large inputs are streamed, not read into memory)."""
    size: int | None = None
    from_stdin = file == "-"
    if from_stdin:
        source: BinaryIO = typer.get_binary_stream("stdin")
    else:
        try:
            source = open(file, "rb")  # noqa: SIM115 - closed in the finally below
            size = os.fstat(source.fileno()).st_size
        except OSError as e:
            _fail(EXIT_USAGE, f"cannot read {file}: {e.strerror or e}")
    try:
        with open_store(store, config) as s, _progress(size is not None and size > 8 << 20) as progress:
            task = progress.add_task(f"put {key[:40]}", total=size)
            info = s.put(key, _CountingReader(source, progress, task))
    finally:
        if not from_stdin:
            source.close()
    if json_:
        _print_json(_info_json(info))
    else:
        where = "large piece (own object)" if info.external else "packed"
        typer.echo(f"put {info.key}: {info.size:,} bytes, {where}")


@_command(app, "get")
def get_cmd(
    key: Annotated[str, typer.Argument(metavar="KEY", help="piece key")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="write here instead of stdout (- is stdout)",
            show_default=False,
        ),
    ] = None,
    offset: Annotated[int, typer.Option(min=0, help="first byte to read")] = 0,
    length: Annotated[
        int | None, typer.Option(min=0, help="bytes to read; default: to the end", show_default=False)
    ] = None,
    store: StoreOpt = None,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Read one piece (or a byte range of it) to stdout, or to a file with -o; checksums verified."""
    if output is not None and str(output) == "-":
        output = None  # `-o -`: standard output, as the usual convention has it
    with open_store(store, config, read_only=True) as s:
        status = _err().status(f"get {key[:60]}") if output is not None else contextlib.nullcontext()
        with status:
            data = s.get(key, offset=offset, length=length)
    if output is None:
        out = _stdout_bytes()
        out.write(data)
        out.flush()
    else:
        _write_atomically(output, [data])


@_command(app, "cat")
def cat_cmd(
    keys: Annotated[list[str], typer.Argument(metavar="KEY...", help="piece keys, written in this order")],
    store: StoreOpt = None,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Write pieces to stdout one after another (fetched together: nearby records in one request)."""
    with open_store(store, config, read_only=True) as s:
        found = s.get_many(keys)
    out = _stdout_bytes()
    for key in keys:
        out.write(found[key])
    out.flush()


@_command(app, "ls")
def ls_cmd(
    prefix: Annotated[str, typer.Argument(metavar="[PREFIX]", help="only keys starting with this")] = "",
    long: Annotated[bool, typer.Option("--long", "-l", help="size, where it lives, key")] = False,
    null: Annotated[
        bool, typer.Option("--null", "-0", help="end keys with NUL (keys may hold newlines)")
    ] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="stop after N pieces", show_default=False)] = None,
    store: StoreOpt = None,
    config: ConfigOpt = None,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List pieces in key order (streamed; --json writes one array, item by item)."""
    write = sys.stdout.write
    with open_store(store, config, read_only=True) as s:
        first = True
        if json_:
            write("[")
        for n, info in enumerate(s.list(prefix)):
            if limit is not None and n >= limit:
                break
            if json_:
                write(("\n  " if first else ",\n  ") + json.dumps(_info_json(info)))
            elif long:
                where = "large" if info.external else (info.table or "buffered")[:16]
                write(f"{info.size:>14}  {where:<16}  {info.key}" + ("\0" if null else "\n"))
            else:
                write(info.key + ("\0" if null else "\n"))
            first = False
        if json_:
            write("]\n" if first else "\n]\n")
    sys.stdout.flush()


def _keys_from_stdin(null: bool) -> list[str]:
    text = typer.get_text_stream("stdin").read()
    return [k for k in text.split("\0" if null else "\n") if k]


@_command(app, "rm")
def rm_cmd(
    keys: Annotated[
        list[str] | None, typer.Argument(metavar="[KEY]...", help="piece keys to delete", show_default=False)
    ] = None,
    from_stdin: Annotated[
        bool, typer.Option("--stdin", help="also read keys from stdin, one per line (NUL with -0)")
    ] = False,
    null: Annotated[bool, typer.Option("--null", "-0", help="stdin keys are NUL-terminated")] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="exit 1, deleting nothing, if any key does not exist")
    ] = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Delete pieces (tombstones, in one commit); deleting a missing piece is not an error."""
    wanted = list(keys or [])
    if from_stdin:
        wanted += _keys_from_stdin(null)
    if not wanted:
        _fail(EXIT_USAGE, "no keys given: name them, or pass --stdin")
    with open_store(store, config) as s:
        if strict:
            missing = [k for k in wanted if not s.exists(k)]
            if missing:
                shown = ", ".join(repr(k[:60]) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
                _fail(EXIT_NOT_FOUND, f"{len(missing)} of {len(wanted)} pieces not found: {shown}")
        s.delete_many(wanted)
    if json_:
        _print_json({"deleted": len(dict.fromkeys(wanted))})


@_command(app, "stat")
def stat_cmd(
    key: Annotated[str, typer.Argument(metavar="KEY", help="piece key")],
    store: StoreOpt = None,
    config: ConfigOpt = None,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show a piece's size, checksum and where it lives."""
    with open_store(store, config, read_only=True) as s:
        info = s.head(key)
    data = _info_json(info)
    if json_:
        _print_json(data)
        return
    for name, value in data.items():
        shown = "-" if value is None else value
        typer.echo(
            f"{name:<9} {shown:,}" if isinstance(shown, int) and name == "size" else f"{name:<9} {shown}"
        )


# -- store commands ---------------------------------------------------------------------------


@_command(app, "profile")
def profile_cmd(
    plot: Annotated[
        Path | None,
        typer.Option("--plot", metavar="FILE", help="also write a PNG: size histogram + table sizes"),
    ] = None,
    fast: Annotated[
        bool, typer.Option("--fast", help="estimate from the indexes only (no listing; upper bounds)")
    ] = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Profile the data: piece counts and sizes, tables and dead space, shards, cache, index RAM."""
    from piecestore.profile import profile_store

    with open_store(store, config, read_only=True) as s, _err().status("profiling"):
        prof = profile_store(s, exact=not fast)
    if plot is not None:
        prof.plot(plot)
    if json_:
        _print_json(prof.to_json())
    else:
        _out().print(prof.render())
    if plot is not None:
        typer.echo(f"plot written to {plot}", err=json_)


@_command(app, "gc")
def gc_cmd(
    delete: Annotated[
        bool, typer.Option("--delete", help="act: compact and delete; without it nothing changes")
    ] = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Garbage-collect: compact sparse tables, delete unreferenced objects past the grace period.

    A dry run unless --delete is given.
    """
    # Not read-only even for a dry run: GC reads the server clock by writing a probe object.
    with open_store(store, config) as s, _progress() as progress:
        reports = _per_shard(s, "gc", lambda fn, label: _call_with_progress(
            fn, _Hook(progress, label), dry_run=not delete
        ))  # fmt: skip
    _show_reports(reports, json_)


@_command(app, "fsck")
def fsck_cmd(
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="restore a damaged or lost manifest from the manifest history (needs write access), "
            "then check the repaired store",
        ),
    ] = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Verify every table, record and large piece the manifest reaches; exit 3 on any problem.

    A manifest too damaged to open the store is reported with the version --repair restores.
    """
    settings = load_cli_settings(store, config)
    with _progress() as progress:
        if settings.sharding.targets or settings.sharding.shards:
            reports = _fsck_sharded(store, config, settings, repair, progress)
        else:
            reports = [(None, _fsck_one(settings.store.url, config, repair, _Hook(progress, "fsck")))]
    _show_reports(reports, json_)
    if not all(_report_ok(r) for _, r in reports):
        raise typer.Exit(EXIT_CORRUPT)


def _fsck_one(url: str, config: Path | None, repair: bool, hook: _Hook, *, shard: bool = False) -> Any:
    """fsck of one (unsharded) store from its backend, so a damaged manifest cannot stop it.

    Read-only unless repairing. ``shard``: the store is one shard of a sharded store.
    """
    from piecestore.api import open_store_backend
    from piecestore.fsck import fsck_backend
    from piecestore.sharding.layout import LAYOUT_OBJECT

    settings = load_cli_settings(url, config, **({} if repair else {"store_read_only": True}))
    backend = open_store_backend(settings.store.url, settings)
    try:
        if not shard and backend.exists(LAYOUT_OBJECT):
            from piecestore.sharding.store import check_unsharded

            check_unsharded(backend)  # one shard alone would miss every other shard's pieces
    except BaseException:
        backend.close()
        raise
    return fsck_backend(backend, settings, hook, repair=repair)


def _fsck_sharded(
    url: str | None, config: Path | None, settings: Settings, repair: bool, progress: Progress
) -> list[tuple[str | None, Any]]:
    """Each shard's fsck; if a shard's damaged manifest keeps the store from opening, shard by shard."""
    try:
        with open_store(url, config, read_only=not repair) as s:
            return _per_shard(s, "fsck", lambda fn, label: _call_with_progress(
                fn, _Hook(progress, label), repair=repair
            ))  # fmt: skip
    except CorruptionError:
        pass
    return [
        (safe_url(shard_url), _fsck_one(shard_url, config, repair, _Hook(progress, f"fsck {i}"), shard=True))
        for i, shard_url in enumerate(settings.shard_urls())
    ]


def _per_shard(
    store: Any, method: str, call: Callable[[Callable[..., Any], str], Any]
) -> list[tuple[str | None, Any]]:
    """Run a maintenance method on the store, or on each shard when the store has no such method."""
    if callable(getattr(store, method, None)):
        return [(None, call(getattr(store, method), method))]
    shards = getattr(store, "shards", None)
    if not isinstance(shards, list):
        _fail(EXIT_ERROR, f"{method} is not available for {type(store).__name__} in this piecestore build")
    return [
        (safe_url(sh.url), call(_require(sh, method, method), f"{method} {i}")) for i, sh in enumerate(shards)
    ]


def _show_reports(reports: list[tuple[str | None, Any]], as_json: bool) -> None:
    if len(reports) == 1 and reports[0][0] is None:
        _show_report(reports[0][1], as_json)
    elif as_json:
        _print_json({"shards": [{"shard": url, **_to_json(r)} for url, r in reports]})
    else:
        for url, report in reports:
            typer.echo(f"== shard {url}")
            _show_report(report, False)


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _options(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            _fail(EXIT_USAGE, f"--set wants NAME=VALUE, got {pair!r}")
        out[name.strip().replace("-", "_")] = _parse_value(value)
    return out


def _check_accepts(fn: Callable[..., Any], options: dict[str, Any], what: str) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(params))
    if unknown:
        known = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY or p.default is not p.empty]
        _fail(EXIT_USAGE, f"{what} has no option {', '.join(unknown)}; it takes: {', '.join(known)}")


def _bench_function(name: str) -> Callable[..., Any]:
    """piecestore.bench's entry points, looked up when used (the benchmark is an optional part)."""
    import importlib

    try:
        fn = getattr(importlib.import_module("piecestore.bench"), name, None)
    except ImportError:
        fn = None
    if not callable(fn):
        _fail(EXIT_ERROR, f"piecestore.bench.{name} is not available in this build")
    return cast("Callable[..., Any]", fn)


SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", metavar="NAME=VALUE", help="option passed through (repeatable)", show_default=False
    ),
]


@_command(app, "bench")
def bench_cmd(
    providers: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[PROVIDER]...",
            help="memory, file, s3, minio (a local S3 server is started) or store URLs; default: all four",
            show_default=False,
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="short cells: indicative numbers in minutes")
    ] = False,
    workload: Annotated[
        list[str] | None,
        typer.Option("--workload", "-w", help="workload name or pattern (repeatable)", show_default=False),
    ] = None,
    seconds: Annotated[
        float | None, typer.Option(min=0.01, help="seconds per measured cell", show_default=False)
    ] = None,
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="where the JSON and charts go")] = Path(
        "bench-results"
    ),
    store: StoreOpt = None,
    config: ConfigOpt = None,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Benchmark piecestore against its storage: large-object bandwidth and one object per piece.

    --store adds that store to the providers. Writes a JSON result and charts under --out.
    """
    run_bench = _bench_function("run_bench")
    names = list(providers or []) + ([store] if store else [])
    result = run_bench(
        names or None,
        quick=quick,
        out_dir=out,
        progress=not json_ and sys.stderr.isatty(),
        workloads=workload or None,
        seconds_per_cell=seconds,
    )
    if json_:
        _print_json(_to_json(result))
        return
    console = _out()
    for method in ("render_table", "render_headline"):
        render = getattr(result, method, None)
        if callable(render):
            console.print(render())
    for path in [getattr(result, "json_path", None), *getattr(result, "chart_paths", [])]:
        if path is not None:
            typer.echo(f"wrote {path}")


@_command(app, "check")
def check_cmd(
    url: Annotated[str, typer.Argument(metavar="URL", help="store URL to check")],
    set_: SetOpt = None,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check that a URL works as a store: reachable, writable, conditional writes honoured."""
    run_check = _bench_function("run_check")
    options = _options(set_)
    _check_accepts(run_check, options, "check")
    with _err().status(f"checking {safe_url(url)}"):
        report = run_check(url, **options)
    if isinstance(getattr(report, "url", None), str):
        report.url = mask_url(report.url)
    _show_report(report, json_)
    if not _report_ok(report):
        raise typer.Exit(_check_failure_code(report))


def _check_failure_code(report: Any) -> int:
    """The exit code of the first failed step, from the error class its detail names (else 5)."""
    import piecestore.errors as errors

    for row in getattr(report, "rows", []):
        if not getattr(row, "ok", True):
            name = str(getattr(row, "detail", "")).partition(":")[0].strip()
            cls = getattr(errors, name, None)
            if isinstance(cls, type) and issubclass(cls, PieceStoreError):
                return exit_code_for(cls(""))
            break
    return EXIT_ERROR


@contextlib.contextmanager
def _open_sharded(url: str | None, config: Path | None) -> Iterator[Any]:
    """The sharded store as its shards record it, even when the configuration already names others.

    Why: the usual way to reshard is to edit sharding.targets first; opening then fails with
    LayoutMismatchError, so reshard opens the recorded layout and moves to the configured one.
    """
    from piecestore.api import open_with_settings
    from piecestore.errors import LayoutMismatchError

    settings = load_cli_settings(url, config)
    if not (settings.sharding.targets or settings.sharding.shards):
        _fail(
            EXIT_USAGE,
            f"{safe_url(settings.store.url)} is not sharded: configure sharding.targets "
            "(or sharding.shards with a template) to reshard",
        )
    try:
        store = open_with_settings(settings)
    except LayoutMismatchError:
        from piecestore.api import open_store_backend
        from piecestore.sharding.store import ShardedStore, read_layout

        recorded = []
        for target_url in settings.shard_urls():
            with contextlib.suppress(PieceStoreError):
                backend = open_store_backend(target_url, settings)
                try:
                    layout, _ = read_layout(backend)
                finally:
                    backend.close()
                if layout is not None:
                    recorded.append(layout)
        if not recorded:
            raise
        newest = max(recorded, key=lambda lay: lay.version)
        store = ShardedStore(settings, targets=list(newest.targets))
    try:
        yield store
    finally:
        store.close()


@_command(app, "reshard")
def reshard_cmd(
    targets: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[TARGET]...",
            help="the new shard store URLs; default: the targets the configuration names",
            show_default=False,
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    grace: Annotated[
        float | None,
        typer.Option(
            "--grace",
            min=0,
            metavar="SECONDS",
            help="wait for other processes to see each layout change; default: the store's",
            show_default=False,
        ),
    ] = None,
    store: StoreOpt = None,
    config: ConfigOpt = None,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Move a sharded store onto new targets; only the pieces whose owner changes are copied.

    Opens the store on the layout its shards record, so editing sharding.targets first and then
    running `piecestore reshard --yes` works; an interrupted reshard resumes when run again.
    """
    with _open_sharded(store, config) as s:
        reshard = _require(s, "reshard", "reshard")
        new: list[Any] = list(targets or [])
        if not new:
            from piecestore.sharding.store import configured_targets

            new = list(configured_targets(s.settings))
        current = [safe_url(str(getattr(t, "url", t))) for t in getattr(s, "shards", [])]
        wanted = [safe_url(str(getattr(t, "url", t))) for t in new]
        if not yes:
            if not sys.stdin.isatty():
                _fail(EXIT_USAGE, "reshard changes where pieces live: pass --yes to run it non-interactively")
            typer.echo(f"from {len(current)} shards: " + ", ".join(current), err=True)
            typer.echo(f"to   {len(wanted)} shards: " + ", ".join(wanted), err=True)
            if not typer.confirm("reshard now?", default=False, err=True):
                _fail(EXIT_USAGE, "aborted; nothing changed")
        options = {} if grace is None else {"grace_seconds": grace}
        with _progress() as progress:
            report = _call_with_progress(reshard, _Hook(progress, "reshard"), new, **options)
        configured = [safe_url(u) for u in s.settings.shard_urls()]
    _show_report(report, json_)
    if targets and configured != wanted:
        typer.echo(
            "note: set sharding.targets to the new targets in your configuration, or opening the "
            "store will report a layout mismatch",
            err=True,
        )


# -- settings ---------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    return json.dumps(value)


@_command(config_app, "show")
def config_show_cmd(
    store: StoreOpt = None,
    config: ConfigOpt = None,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Print the settings in effect (config file < environment < options); secrets show as ***."""
    settings = load_cli_settings(store, config)
    data = settings.redacted()
    data["store"]["url"] = mask_url(data["store"]["url"])
    data["s3"]["endpoint"] = mask_url(data["s3"]["endpoint"])
    data["sharding"]["template"] = mask_url(data["sharding"]["template"])
    data["sharding"]["targets"] = [mask_url(t) for t in data["sharding"]["targets"]]
    if json_:
        _print_json(data)
        return
    lines: list[str] = []
    for group, values in data.items():
        lines.append(f"[{group}]")
        for name, value in values.items():
            lines.append(f"# {name} = (not set)" if value is None else f"{name} = {_toml_value(value)}")
        lines.append("")
    typer.echo("\n".join(lines).rstrip("\n"))


# -- demo -------------------------------------------------------------------------------------


class _Phase:
    """One timed demo step: pieces and bytes moved, for the throughput table."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pieces = 0
        self.bytes = 0
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> _Phase:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start

    def to_json(self) -> dict[str, Any]:
        s = max(self.seconds, 1e-9)
        return {
            "phase": self.name, "pieces": self.pieces, "bytes": self.bytes, "seconds": self.seconds,
            "pieces_per_second": self.pieces / s, "mib_per_second": self.bytes / s / (1 << 20),
        }  # fmt: skip


def _demo_values(count: int, rng: random.Random, lo: int = 32, hi: int = 8192) -> list[bytes]:
    """Sizes log-uniform in [lo, hi], so the profile's histogram spans several buckets."""
    import math

    span = math.log(hi / lo)
    return [rng.randbytes(int(lo * math.exp(rng.random() * span))) for _ in range(count)]


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@_command(app, "demo")
def demo_cmd(
    pieces: Annotated[int, typer.Option(min=1, help="small pieces written with put_many")] = 20_000,
    large: Annotated[int, typer.Option(min=0, help="large pieces (each its own object)")] = 3,
    large_size: Annotated[int, typer.Option(min=1, help="bytes per large piece")] = 4 << 20,
    threads: Annotated[int, typer.Option(min=1, help="threads doing single puts")] = 16,
    batch: Annotated[int, typer.Option(min=1, help="pieces per put_many / get_many call")] = 2000,
    seed: Annotated[
        int | None, typer.Option(help="random seed; default: a new one", show_default=False)
    ] = None,
    store: StoreOpt = None,
    config: ConfigOpt = None,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The main job on an embedded default store: write, read back verified, list, delete, profile.

    Writes small pieces with put_many and with many threads of put, plus a few large pieces, to
    the store (./piecestore-data unless --store or the settings say otherwise), reads them all
    back with get_many comparing every byte, re-reads a tenth with threads of get (served by the
    cache), lists them, deletes a tenth, and prints throughput and the store's profile. Pieces
    go under demo/<run>/, so runs never overwrite each other.
    """
    from piecestore.profile import human_bytes, profile_store

    rng = random.Random(seed)
    run = f"demo/{time.strftime('%Y%m%d-%H%M%S')}-{rng.randrange(16**6):06x}"
    threaded = max(1, pieces // 10)
    small = {f"{run}/batch/{i:07d}": v for i, v in enumerate(_demo_values(pieces, rng))}
    singles = {f"{run}/thread/{i:06d}": v for i, v in enumerate(_demo_values(threaded, rng))}
    bigs = {f"{run}/large/{i:03d}": rng.randbytes(large_size) for i in range(large)}
    expected = small | singles | bigs
    phases: list[_Phase] = []
    log = _err() if json_ else _out()
    with open_store(store, config) as s, _progress() as progress:
        log.print(f"demo on {safe_url(s.url)} under {run}/", markup=False)

        with _Phase("put_many (small)") as ph:
            task = progress.add_task("put_many", total=len(small))
            for chunk in _batches(list(small.items()), batch):
                s.put_many(chunk)
                ph.pieces += len(chunk)
                ph.bytes += sum(len(v) for _, v in chunk)
                progress.advance(task, len(chunk))
        phases.append(ph)

        with _Phase(f"put x{threads} threads") as ph:
            task = progress.add_task(f"put ({threads} threads)", total=len(singles) + len(bigs))

            def put_one(item: tuple[str, bytes]) -> int:
                s.put(item[0], item[1])
                progress.advance(task, 1)
                return len(item[1])

            with ThreadPoolExecutor(threads, thread_name_prefix="demo-put") as pool:
                sizes = list(pool.map(put_one, list(singles.items()) + list(bigs.items())))
            ph.pieces, ph.bytes = len(sizes), sum(sizes)
        phases.append(ph)

        with _Phase("get_many (verified)") as ph:
            keys = list(expected)
            task = progress.add_task("get_many", total=len(keys))
            for chunk in _batches(keys, batch):
                got = s.get_many(chunk)
                for key in chunk:
                    if got.get(key) != expected[key]:
                        raise CorruptionError(f"demo: piece {key!r} read back different bytes than written")
                ph.pieces += len(chunk)
                ph.bytes += sum(len(got[k]) for k in chunk)
                progress.advance(task, len(chunk))
        phases.append(ph)

        with _Phase(f"get x{threads} threads (hot)") as ph:
            hot = rng.sample(list(small), min(len(small), max(1, pieces // 10)))
            task = progress.add_task(f"get ({threads} threads)", total=len(hot))

            def get_one(key: str) -> int:
                value = s.get(key)
                if value != small[key]:
                    raise CorruptionError(f"demo: piece {key!r} read back different bytes than written")
                progress.advance(task, 1)
                return len(value)

            with ThreadPoolExecutor(threads, thread_name_prefix="demo-get") as pool:
                sizes = list(pool.map(get_one, hot))
            ph.pieces, ph.bytes = len(sizes), sum(sizes)
        phases.append(ph)

        with _Phase("list") as ph:
            listed = 0
            for info in s.list(run + "/"):
                listed += 1
                ph.bytes += info.size
            ph.pieces = listed
        phases.append(ph)
        if listed != len(expected):
            raise CorruptionError(f"demo: listed {listed} pieces under {run}/, wrote {len(expected)}")

        doomed = keys[::10]
        with _Phase("delete_many") as ph:
            s.delete_many(doomed)
            ph.pieces = len(doomed)
        phases.append(ph)
        gone = [k for k in doomed[:: max(1, len(doomed) // 50)] if s.exists(k)]
        if gone:
            raise CorruptionError(f"demo: {len(gone)} deleted pieces still readable, e.g. {gone[0]!r}")
        remaining = sum(1 for _ in s.list(run + "/"))
        if remaining != len(expected) - len(doomed):
            raise CorruptionError(
                f"demo: {remaining} pieces left under {run}/ after deleting {len(doomed)} of {len(expected)}"
            )

        with log.status("profiling") if not json_ else contextlib.nullcontext():
            prof = profile_store(s)

    if json_:
        _print_json(
            {
                "store": safe_url(s.url),
                "run": run,
                "written": len(expected),
                "deleted": len(doomed),
                "remaining": remaining,
                "phases": [p.to_json() for p in phases],
                "profile": prof.to_json(),
            }
        )
        return
    from rich.table import Table

    table = Table(title="throughput", title_justify="left", show_edge=False)
    for col in ("phase", "pieces", "bytes", "seconds", "pieces/s", "MiB/s"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for p in phases:
        j = p.to_json()
        table.add_row(
            p.name, f"{p.pieces:,}", human_bytes(p.bytes), f"{p.seconds:.3f}",
            f"{j['pieces_per_second']:,.0f}", f"{j['mib_per_second']:,.1f}",
        )  # fmt: skip
    log.print(table)
    log.print(
        f"verified {len(expected):,} pieces byte for byte; deleted {len(doomed):,}; "
        f"{remaining:,} remain under {run}/",
        markup=False,
    )
    log.print(prof.render())
