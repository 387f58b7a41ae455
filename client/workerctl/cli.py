"""workerctl: the command line front of the client.

Every failure becomes one line on stderr and an exit code (docs/operations.md §11); --json
prints exactly one JSON document on stdout (NaN and infinities as null: see workerctl.jsonout). Every argument
is checked before connecting, so a usage error is exit 2 even with no daemon.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__, core, errors, protocol
from .client import DEFAULT_WINDOW, Client
from .core import MAX_CHUNK
from .jsonout import dumps
from .render import render_clear, render_memory, render_status

CONTROL_TIMEOUT = 30.0
# How long an interrupted run waits for the daemon to confirm its cancel before it exits.
STOP_WAIT_S = 5.0


def parse_assignment(text: str) -> tuple[str, Any]:
    """key=value, the value parsed as JSON when it parses and taken as a string otherwise."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def parse_json_arg(text: str, kind: type, flag: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{flag} must be a JSON {'array' if kind is list else 'object'}")
    return value


# -- argument types: each names what it wants; argparse adds the flag ("argument --retries: ...")


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def bounded(low: int, high: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text!r}")
        return value

    return check


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, got {text!r}")
    return value


def add_globals(parser: argparse.ArgumentParser, default: Any) -> None:
    """--socket, --timeout and --json: on the main parser (with their defaults), and on every
    command's with `default` argparse.SUPPRESS, so that they may come after the command too
    (`workerctl status --json`, as with docker and kubectl) without one place undoing the other."""
    parser.add_argument(
        "--socket", default=default, help="control socket path (default: as workerd resolves it)"
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        metavar="S",
        default=default,
        help=f"seconds to wait for a reply (default {CONTROL_TIMEOUT:g}; for run: no limit: the "
        "daemon answers once the task ends or times out, after any time it waits in the queue)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default,
        help="print one JSON document on stdout (NaN and infinities as null)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workerctl", description="Talk to the workerd daemon.")
    parser.add_argument("--version", action="version", version=f"workerctl {__version__}")
    add_globals(parser, None)
    parser.set_defaults(json=False)
    shared = argparse.ArgumentParser(add_help=False)
    add_globals(shared, argparse.SUPPRESS)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, help=help_text, parents=[shared])

    command("ping", "check that the daemon answers")
    command("status", "daemon, pool and queue state")
    command("memory", "memory of the daemon, its workers and the GPU")
    clear = command("clear", "free memory in the workers")
    clear.add_argument(
        "--level",
        choices=("gc", "cache", "full"),
        default="cache",
        help="gc: collect garbage in every worker; cache: also empty the CUDA cache; "
        "full: also drop every cached pipeline (default %(default)s)",
    )
    scale = command("scale", "set the number of CPU workers")
    scale.add_argument(
        "workers",
        type=bounded(1, protocol.MAX_WORKERS),
        metavar="N",
        help=f"CPU workers to aim for, 1 to {protocol.MAX_WORKERS} (until the next reload)",
    )
    command("reload", "re-import task code and replace workers one by one")
    add_run(command("run", "run a task (module:function) or a pipeline"))
    cancel = command("cancel", "cancel requests of yours by their ids (run --json prints them)")
    cancel.add_argument("ids", nargs="+", type=request_id, metavar="ID", help="request ids")
    cancel.add_argument(
        "--terminate",
        action="store_true",
        help="also stop requests that are already running (their workers are killed and replaced)",
    )
    return parser


def request_id(text: str) -> int | str:
    """A request id as the protocol has them: an integer when it reads as one, else a string."""
    if len(text) > protocol.MAX_ID_LENGTH:
        raise argparse.ArgumentTypeError(f"a request id has at most {protocol.MAX_ID_LENGTH} characters")
    try:
        return int(text)
    except ValueError:
        return text


def add_run(run: argparse.ArgumentParser) -> None:
    run.add_argument("name", help="'package.module:function' for a CPU task, or a pipeline name")
    run.add_argument(
        "assignments",
        nargs="*",
        default=[],  # without a default, argparse calls a "*" positional required
        metavar="key=value",
        help="keyword arguments, before or after the options; a value is JSON if it parses (n=3 is "
        "a number), else a string",
    )
    run.add_argument("--args", dest="args_json", metavar="JSON", help="positional arguments, a JSON array")
    run.add_argument("--kwargs", dest="kwargs_json", metavar="JSON", help="keyword arguments, a JSON object")
    run.add_argument(
        "--task-timeout",
        type=seconds,
        metavar="S",
        help="the run's time limit (default: the daemon's config)",
    )
    run.add_argument(
        "--retries",
        type=bounded(0, protocol.MAX_RETRIES),
        default=0,
        metavar="N",
        help=f"re-run up to N times if its worker dies (WORKER_LOST; idempotent work only), 0 to "
        f"{protocol.MAX_RETRIES}",
    )
    run.add_argument(
        "--priority",
        type=bounded(protocol.PRIORITY_MIN, protocol.PRIORITY_MAX),
        default=0,
        metavar="P",
        help=f"{protocol.PRIORITY_MIN} to {protocol.PRIORITY_MAX}, default 0: higher runs first among your "
        "requests, and ahead of other users' only as far as the daemon's [fairness] max_priority lets it",
    )
    batch = run.add_argument_group("batch", "one call per line of a JSON-lines file")
    batch.add_argument(
        "--batch", metavar="IN.jsonl", help="input: one JSON object (kwargs) or array (args) per line"
    )
    batch.add_argument(
        "--output", metavar="OUT.jsonl", help="append results here as they complete (default: stdout)"
    )
    batch.add_argument("--resume", action="store_true", help="skip inputs already in --output")
    batch.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --resume: also run again the inputs whose line in --output is an error",
    )
    batch.add_argument(
        "--window",
        type=positive,
        default=DEFAULT_WINDOW,
        metavar="N",
        help="requests in flight (default %(default)s)",
    )
    batch.add_argument(
        "--chunksize",
        type=bounded(1, MAX_CHUNK),
        default=1,
        metavar="K",
        help="calls per request (default %(default)s; a chunk fails or times out as a whole)",
    )


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments; `key=value` after run's options too (`run NAME --task-timeout 5 n=3`),
    which argparse alone would call unrecognized: it gives a positional's values all at once."""
    args, extra = parser.parse_known_args(argv)
    stray = [text for text in extra if text.startswith("-") or "=" not in text]
    if stray or (extra and args.command != "run"):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.assignments += extra
    return args


def emit(args: argparse.Namespace, value: Any, human: Callable[[Any], str]) -> None:
    print(dumps(value) if args.json else human(value))


def command_ping(client: Client, args: argparse.Namespace) -> int:
    emit(
        args,
        client.ping(),
        lambda r: (
            f"pong from workerd {r['version']} (pid {r['pid']}, "
            f"up {r['uptime_s']:.1f} s, protocol {r['protocols']})"
            + (f"\ndegraded: {r['degraded']}" if r.get("degraded") else "")
        ),
    )
    return errors.EXIT_OK


def command_status(client: Client, args: argparse.Namespace) -> int:
    emit(args, client.status(), render_status)
    return errors.EXIT_OK


def command_memory(client: Client, args: argparse.Namespace) -> int:
    emit(args, client.memory_status(), render_memory)
    return errors.EXIT_OK


def command_clear(client: Client, args: argparse.Namespace) -> int:
    emit(args, client.clear_memory(args.level), render_clear)
    return errors.EXIT_OK


def command_scale(client: Client, args: argparse.Namespace) -> int:
    cpus = os.cpu_count() or 1
    if args.workers > cpus:
        # The daemon is on this machine (a Unix socket): its CPUs are ours.
        print(
            f"workerctl: warning: {args.workers} workers on {cpus} CPUs: workers beyond one per CPU "
            "only help tasks that wait (I/O, sleep), and each holds its own private memory",
            file=sys.stderr,
        )
    emit(args, client.scale(args.workers), lambda r: f"workers: {r['workers']}")
    return errors.EXIT_OK


def command_reload(client: Client, args: argparse.Namespace) -> int:
    emit(args, client.reload(), lambda r: f"reloaded: generation {r['generation']}")
    return errors.EXIT_OK


def command_run(client: Client, args: argparse.Namespace) -> int:
    if args.batch is not None:
        return command_batch(client, args)
    positional, keywords = args.arguments
    fields = core.execute_fields(args.name, positional, keywords, args.task_timeout, args.retries)
    request = client.send("execute", **fields)
    if args.json:
        # For `workerctl cancel` from elsewhere; stdout keeps its one document, the result.
        print(dumps({"request_id": request}), file=sys.stderr, flush=True)
    events = core.Events()
    items: list[Any] = []
    try:
        for reply in client.replies(request, core.reply_wait(client.timeout, args.task_timeout)):
            kind, value = events.event(reply)
            if args.json:
                items.append(value)
            elif kind == "item" or not events.streamed:
                # Without --json, a generator's items are printed as they arrive, one per line.
                print(dumps(value), flush=True)
    finally:
        if not events.ended:
            # Interrupted (Ctrl-C, SIGTERM, SIGHUP), a client timeout, stdout gone: the run is
            # not wanted any more, wherever it is; its worker is killed if it has started.
            stop_requests(client, [request], terminate=True)
    if args.json:
        print(dumps(items[:-1] if events.streamed else items[-1]))
    return errors.EXIT_OK


def stop_requests(client: Client, ids: list[int], terminate: bool) -> None:
    """Cancel `ids` and wait (briefly) for the daemon to say so: the socket is closed without
    linger right after, which would drop a cancel still on its way out."""
    try:
        for fields in core.cancel_requests(ids, terminate):
            client.request("cancel", timeout=STOP_WAIT_S, **fields)
    except (errors.WorkerdError, KeyboardInterrupt):
        pass  # the daemon is gone or slow, or a second Ctrl-C: leave


def command_batch(client: Client, args: argparse.Namespace) -> int:
    # Imported here: batch bookkeeping is not for `workerctl ping`.
    from . import batch

    output = args.output or "-"
    show = sys.stderr.isatty() and not args.json
    options = batch.Options(
        name=args.name,
        input=args.batch,
        output=output,
        resume=args.resume,
        retry_failed=args.retry_failed,
        window=args.window,
        chunksize=args.chunksize,
        timeout_s=args.task_timeout,
        retries=args.retries,
        show_progress=show,
    )
    progress = batch.Progress(stream=sys.stderr if show else None)
    stopped: BaseException | None = None
    try:
        batch.run_batch(client, options, progress)
    except (KeyboardInterrupt, errors.WorkerdError) as exc:
        stopped = exc
    if isinstance(stopped, KeyboardInterrupt):
        # The batch's queued and prefetched calls were cancelled without waiting (cancel_nowait);
        # a reply to a later request on the same connection says the daemon has read that.
        settle(client)
    summary = progress.summary()
    line = (
        f"batch: {summary['done']} done, {summary['failed']} failed, {summary['lost']} lost, "
        f"{summary['skipped']} skipped (already in the output) in {summary['seconds']:.1f} s"
    )
    if args.retry_failed:
        line += f"; {summary['retried']} failed lines of the output run again"
    if summary["lost"]:
        line += "; lost calls (the connection dropped under them) are not recorded"
    if stopped is not None:
        line += "; stopped early"
    if (stopped is not None or summary["lost"]) and output != "-":
        line += "; rerun with --resume to finish"
    print(line, file=sys.stderr)
    if args.json and output != "-":
        print(dumps({**summary, "output": output, "complete": stopped is None}))
    if stopped is not None:
        raise stopped
    return errors.EXIT_FAILED if progress.failed or progress.lost else errors.EXIT_OK


def settle(client: Client) -> None:
    """Wait (briefly) until the daemon has read what this client sent so far."""
    try:
        client.request("ping", timeout=STOP_WAIT_S)
    except (errors.WorkerdError, KeyboardInterrupt):
        pass


def command_cancel(client: Client, args: argparse.Namespace) -> int:
    """Cancel by id, on any of this user's connections (`workerctl cancel` has a connection of
    its own): the ids `run --json` printed."""
    result = client.cancel(args.ids, args.terminate, any_connection=True)

    def human(r: dict[str, list[Any]]) -> str:
        lines = [f"cancelled: {' '.join(map(str, r['cancelled']))}"] if r["cancelled"] else []
        if r["running"]:
            lines.append(
                f"running, not stopped (--terminate kills their workers): {' '.join(map(str, r['running']))}"
            )
        if r["unknown"]:
            lines.append(
                "unknown (already answered, never sent, or another user's): "
                + " ".join(map(str, r["unknown"]))
            )
        return "\n".join(lines)

    emit(args, result, human)
    return errors.EXIT_OK if len(result["cancelled"]) == len(args.ids) else errors.EXIT_FAILED


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "ping": command_ping,
    "status": command_status,
    "memory": command_memory,
    "clear": command_clear,
    "scale": command_scale,
    "reload": command_reload,
    "run": command_run,
    "cancel": command_cancel,
}


def check_run(args: argparse.Namespace) -> None:
    """Parse run's arguments before connecting: a usage error is exit 2 even with no daemon."""
    if args.retry_failed and not args.resume:
        raise ValueError("--retry-failed goes with --resume (it runs the failed lines of --output again)")
    if args.batch is not None:
        if args.assignments or args.args_json or args.kwargs_json:
            raise ValueError(
                "--batch takes the arguments from its input lines, not key=value, --args, --kwargs"
            )
        output = args.output or "-"
        if args.resume and output == "-":
            raise ValueError("--resume needs --output FILE (the results so far tell what is done)")
        if not os.path.isfile(args.batch):
            raise ValueError(f"--batch: no such file: {args.batch}")
        if output != "-" and not args.resume and os.path.exists(output) and os.path.getsize(output) > 0:
            raise ValueError(f"{output} already holds results: --resume to go on with it, or remove it")
        if output != "-":
            check_output(output)
        return
    if args.output or args.resume:
        raise ValueError("--output and --resume go with --batch")
    positional = parse_json_arg(args.args_json, list, "--args") if args.args_json else []
    keywords = parse_json_arg(args.kwargs_json, dict, "--kwargs") if args.kwargs_json else {}
    keywords.update(parse_assignment(text) for text in args.assignments)
    args.arguments = (positional, keywords)


def check_output(path: str) -> None:
    """--output must be a file we can append to (exit 73, EX_CANTCREAT, before connecting)."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise errors.OutputUnwritable(f"cannot create --output {path}: no directory {directory}")
    if os.path.isdir(path):
        raise errors.OutputUnwritable(f"cannot create --output {path}: it is a directory")
    if not os.access(path if os.path.exists(path) else directory, os.W_OK):
        raise errors.OutputUnwritable(f"cannot create --output {path}: permission denied")


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP: handled as Ctrl-C is (work in flight cancelled, output complete)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def stop_on(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    timeout = args.timeout
    if timeout is None and args.command != "run":
        timeout = CONTROL_TIMEOUT
    if args.command == "run":
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, stop_on)
    try:
        if args.command == "run":
            check_run(args)
        # run's ids start at a random number, so that `workerctl cancel` (another connection)
        # names only this run's, and the daemon kills its running jobs too when it goes.
        first_id = secrets.randbelow(9 * 10**9) + 10**9 if args.command == "run" else 1
        dies = args.command == "run"
        priority = args.priority if args.command == "run" else 0
        with Client(
            args.socket, timeout=timeout, first_id=first_id, die_with_client=dies, priority=priority
        ) as client:
            return COMMANDS[args.command](client, args)
    except errors.WorkerdError as exc:
        # First: a task's TaskError[ValueError] is also a ValueError, and no usage error.
        fail(args, exc.code, exc.message, exc.details, describe(exc))
        return exc.exit_code
    except ValueError as exc:
        fail(args, errors.UsageError.code, str(exc), {}, str(exc))
        return errors.EXIT_USAGE
    except Stopped as exc:
        print(f"workerctl: stopped by {signal.Signals(exc.signum).name}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("workerctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`workerctl run ... | head`): not our failure. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return errors.EXIT_OK


def fail(args: argparse.Namespace, code: str, message: str, details: dict[str, Any], line: str) -> None:
    """A failure: its line on stderr, and with --json its one document on stdout (a batch's
    summary, or its result lines, are the batch's documents already)."""
    print(f"workerctl: {line}", file=sys.stderr)
    if args.json and getattr(args, "batch", None) is None:
        print(dumps({"error": {"code": code, "message": message, "details": details}}))


def describe(exc: errors.WorkerdError) -> str:
    """One line for a failure; a task's traceback follows it when there is one."""
    # Daemon errors carry their protocol code; client-side messages are already whole sentences.
    line = f"{exc.code}: {exc.message}" if exc.code in protocol.ERROR_CODES else exc.message
    traceback = exc.details.get("traceback")
    if isinstance(traceback, str) and traceback:
        line += "\n" + traceback.rstrip()
    return line


if __name__ == "__main__":
    sys.exit(main())
