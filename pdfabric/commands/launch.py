"""``pdfabric launch FILE``: run a whole deployment from one topology file.

Preflight (ports, model, vLLM, transports), then every engine in parallel and the proxy,
with a progress display; then the post-start checks (layout fingerprints equal, each
prefill -> decode link probed with a real transfer, its GB/s printed) and the endpoint
table. ``--demo`` sends the demo questions and exits (``--serve`` keeps serving);
``--dry-run`` prints the exact commands and environment and starts nothing. ``--only NAMES``
starts just those processes (one launch per host for a topology spread over several
hosts); its checks cover only the engines it started. While serving, a process that exits
is restarted (``--restart``, ``--max-restarts``; ``pdfabric.launch.runner``). Ctrl-C or
SIGTERM stops everything, by process id. Exit codes: 0 ok, 1 a process or check failed,
2 bad input (topology, preflight).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdfabric.launch.record import LAUNCH_RECORD, LAUNCH_SECRET_FILE, PROXY_STATE_FILE, live_record, write_record

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("launch", help="start engines and proxy from a topology file",
                              description="Start every engine and the proxy of a topology; stop them on Ctrl-C.")
    p.add_argument("file", metavar="FILE", nargs="?",
                   help="topology YAML, or the name of a built-in one (`pdfabric config list`); "
                        "default: the built-in cpu-1p1d-tcp")
    p.add_argument("--dry-run", action="store_true", help="print the commands and environment, start nothing")
    p.add_argument("--demo", action="store_true", help="send the demo questions through the proxy, then stop")
    p.add_argument("--serve", action="store_true", help="with --demo: keep serving afterwards")
    p.add_argument("--log-dir", type=Path, default=Path("pdfabric-logs"), help="one log file per process (default: pdfabric-logs)")
    p.add_argument("--timeout", type=_positive_seconds, default=600.0,
                   help="seconds to wait for each group (engines, proxy) to be ready (default: 600)")
    p.add_argument("--only", metavar="NAMES",
                   help="start only these processes (comma-separated instance names, proxy, cache-server): "
                        "one launch per host when the topology spans several hosts")
    p.add_argument("--restart", choices=["always", "never"], default="always",
                   help="while serving, restart a process that exits or hangs (default: always); never: stop the launch")
    p.add_argument("--max-restarts", type=_count, default=3, metavar="N",
                   help="a process that ends more than N times within 10 minutes stops the launch (default: 3)")
    p.add_argument("--hang-timeout", type=_seconds, default=60.0, metavar="S",
                   help="a serving process whose health endpoint has not answered for S seconds is killed "
                        "and restarted (default: 60; 0: only exits count)")
    p.add_argument("--platform", choices=["auto", "cpu", "cuda"], default="auto",
                   help="engine environment: CPU core binding or CUDA devices (auto: from the installed vLLM)")
    p.set_defaults(func=run)


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return n


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        s = -1.0
    if not s >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return s


def _positive_seconds(text: str) -> float:
    s = _seconds(text)
    if s == 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return s


@dataclass(frozen=True)
class _Prepared:
    """What a launch (or its dry run) works from, once the topology and flags are checked."""

    topo: Any
    file: Path  # the topology given (a built-in's file inside the package)
    builtin: bool
    run_file: Path  # where the processes read it (a built-in's copy in the log directory)
    platform: str
    plan: list[Any]
    secret: str | None  # this launch's own secret, when the topology names none


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from pdfabric.errors import ConfigError

    console = Console(stderr=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 160  # piped or logged: do not squeeze the tables to 80 columns
    try:
        prep = _prepare(args)
    except ConfigError as e:
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        return 2
    if args.dry_run:
        return _dry_run(args, prep)
    from pdfabric.launch.preflight import preflight

    other = _live_launch(args.log_dir)
    if other is not None:
        console.print(f"[red]error:[/] the log directory {escape(str(args.log_dir))} belongs to the launch running as "
                      f"pid {other}; give this one its own --log-dir", highlight=False)
        return 2
    problems = preflight(prep.topo, prep.plan, prep.platform)  # the processes this launch starts
    for msg in problems:
        console.print(f"[red]preflight:[/] {escape(msg)}", highlight=False)
    if problems:
        return 2
    if prep.builtin:
        console.print(f"topology: built-in {escape(prep.file.stem)} (copied to {escape(str(prep.run_file))})",
                      highlight=False)
        prep.run_file.parent.mkdir(parents=True, exist_ok=True)
        prep.run_file.write_bytes(prep.file.read_bytes())
    key = (prep.topo.shared_secret() or prep.secret or "").encode()
    return _run(prep.topo, prep.plan, args, key, console, prep.run_file, prep.secret)


def _prepare(args: argparse.Namespace) -> _Prepared:
    """Load the topology and build the plan of processes; ``ConfigError`` on bad input."""
    from pdfabric.config import load_topology
    from pdfabric.config.builtin import topology_path
    from pdfabric.errors import ConfigError
    from pdfabric.launch.plan import build_plan, detect_platform, select_processes

    file, builtin = topology_path(args.file)
    # a built-in topology runs from a copy in the log directory: the processes read it
    # there, and its relative paths (a disk cache tier) land there, not in the package
    run_file = args.log_dir / file.name if builtin else file
    topo = load_topology(file, check_secrets=not args.dry_run)
    only = select_processes(topo, args.only) if args.only is not None else None
    elsewhere = [i.name for i in topo.instances if only is not None and i.name not in only]
    if only is not None and args.demo and "proxy" not in only:
        raise ConfigError("--demo sends its questions through the proxy: add proxy to --only, or drop --demo")
    if args.demo and elsewhere and topo.secret is None:
        raise ConfigError(f"--demo reads the transfer counters of engines another launch starts "
                          f"({', '.join(elsewhere)}): the topology needs a `secret` they share")
    platform = detect_platform() if args.platform == "auto" else args.platform
    engines_here = only is None or any(i.name in only for i in topo.instances)
    model = _model_dir(topo, args.dry_run or not engines_here)
    secret = None if topo.secret is not None else os.urandom(16).hex()
    plan = build_plan(topo, run_file.resolve(), model, platform, launch_secret=secret,
                      proxy_state=(args.log_dir / PROXY_STATE_FILE).resolve())
    if only is not None:
        plan = _select(plan, only)
    return _Prepared(topo, file, builtin, run_file, platform, plan, secret)


def _dry_run(args: argparse.Namespace, prep: _Prepared) -> int:
    """Print the platform, any secret a launch would still need, and each process's command."""
    from pdfabric.config import load_topology
    from pdfabric.errors import ConfigError

    how = "auto: from the installed vLLM; --platform cpu|cuda to choose" if args.platform == "auto" else "--platform"
    print(f"# platform: {prep.platform} ({how})")
    try:
        load_topology(prep.file, check_secrets=True)
    except ConfigError as e:  # the dry run itself does not need them
        print(f"# note: {e}; a launch (without --dry-run) refuses to start until it does")
    if prep.builtin:
        dest = prep.run_file.resolve()
        print(f"# topology: built-in {prep.file.stem}, run from a copy: mkdir -p {dest.parent} && cp {prep.file} {dest}\n")
    for spec in prep.plan:
        print(f"# {spec.name} ({spec.kind}), ready at {spec.ready_url}\n{spec.shell()}\n")
    return 0


def _select(plan: list[Any], only: set[str]) -> list[Any]:
    """The named processes. A proxy whose engines another launch starts is ready once it
    serves HTTP (``/live``): its ``/health`` waits for a healthy decode engine."""
    from dataclasses import replace

    picked = [spec for spec in plan if spec.name in only]
    if any(spec.kind == "engine" and spec.name not in only for spec in plan):
        picked = [replace(s, ready_url=s.ready_url.rsplit("/", 1)[0] + "/live") if s.kind == "proxy" else s
                  for s in picked]
    return picked


def _model_dir(topo: Any, dry_run: bool) -> Path:
    """The model directory; a dry run (or a launch that starts no engine) neither builds nor
    checks it."""
    if dry_run and topo.model.builtin == "tiny-llama":
        from pdfabric.testing.tinymodel import default_cache_root, recipe_digest

        return default_cache_root() / f"tiny-llama-{recipe_digest()}"
    if dry_run:
        return Path(topo.resolve_path(topo.model.path))
    from pdfabric.launch.preflight import resolve_model

    return resolve_model(topo)


def _run(topo: Any, plan: list[Any], args: argparse.Namespace, key: bytes, console: Any, run_file: Path,
         secret: str | None) -> int:
    from rich.markup import escape

    from pdfabric.launch.checks import endpoints_table, post_start_checks, wait_for_instances
    from pdfabric.launch.runner import LaunchFailed, Runner

    runner = Runner(plan, args.log_dir, console)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        _record_launch(args.log_dir, topo, run_file, secret, {spec.name for spec in plan})
        # a new launch starts from its topology; admin changes carry over only across restarts within it
        (args.log_dir / PROXY_STATE_FILE).unlink(missing_ok=True)
        runner.start(args.timeout)
        here = {spec.name for spec in plan}
        post_start_checks(topo, key, console, here)
        console.print(endpoints_table(topo, args.log_dir, here))
        if args.demo and not here >= {i.name for i in topo.instances}:
            wait_for_instances(topo, args.timeout, console)  # the engines other launches start
        if args.demo:
            from pdfabric.launch.demo import run_demo

            run_demo(topo, key, console)
        if not args.demo or args.serve:
            console.print("serving; Ctrl-C stops every process")
            why = runner.supervise(args.restart, args.max_restarts, args.timeout, args.hang_timeout)
            console.print(f"[red]stopped:[/] {escape(why)}; see {escape(str(args.log_dir))}")
            return 1
        return 0
    except LaunchFailed as e:
        console.print(f"[red]launch failed:[/] {escape(f'{e.name} {e.why}')}\n--- last lines of its log ---\n{escape(e.tail)}", highlight=False)
        return 1
    except RuntimeError as e:
        console.print(f"[red]check failed:[/] {escape(str(e))}", highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print("stopping")
        return 0
    finally:
        runner.stop()
        _forget_launch(args.log_dir)
        signal.signal(signal.SIGTERM, previous)
        left = runner.alive()
        if left:  # never expected: stop() waits for every process
            console.print(f"[red]still running:[/] {[p.popen.pid for p in left if p.popen]}")




def _record_launch(log_dir: Path, topo: Any, run_file: Path, secret: str | None, here: set[str]) -> None:
    """``<log-dir>/launch.json``: what ``pdfabric status`` needs to find this launch (the
    topology it runs, its proxy's URL), and ``launch-secret`` (mode 0600) when the engines
    got a per-launch secret, so that status can ask their connectors. Both go when it ends."""
    log_dir.mkdir(parents=True, exist_ok=True)
    secret_file = None
    if secret is not None and here & {i.name for i in topo.instances}:
        path = log_dir / LAUNCH_SECRET_FILE
        path.unlink(missing_ok=True)  # a new file, mode 0600 (not a link, not an old file's mode)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret)
        secret_file = str(path.resolve())
    host: str | None = topo.proxy.host
    if host in ("0.0.0.0", "::", ""):  # listening everywhere: here it is loopback, elsewhere unknown
        host = "127.0.0.1" if "proxy" in here else None
    proxy = None if host is None else f"http://[{host}]:{topo.proxy.port}" if ":" in host else f"http://{host}:{topo.proxy.port}"
    write_record(log_dir, {"topology": str(run_file.resolve()), "proxy": proxy, "secret_file": secret_file})


def _live_launch(log_dir: Path) -> int | None:
    """The pid of another launch still running with this log directory, else None."""
    record = live_record(log_dir)
    pid = None if record is None else int(record["pid"])
    return pid if pid != os.getpid() else None


def _forget_launch(log_dir: Path) -> None:
    for name in (LAUNCH_RECORD, LAUNCH_SECRET_FILE):
        (log_dir / name).unlink(missing_ok=True)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(argparse.Namespace()))
