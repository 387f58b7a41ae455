"""The `workerd` command: run the daemon in the foreground, or check a config file.

Runs in: the master. (`workerd --check-config` too, before any master exists.)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from workerd import __version__, config, control, importcheck
from workerd.logs import setup_logging
from workerd.master import Master, load_config

# Named exit codes (sysexits.h), so systemd can tell a bad config from a crash and need not
# restart in a loop on what a restart cannot fix (RestartPreventExitStatus= in the unit).
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: the socket is taken or cannot be bound
LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workerd", description="Keep expensive Python work warm (runs in the foreground)."
    )
    parser.add_argument("--version", action="version", version=f"workerd {__version__}")
    parser.add_argument("--config", metavar="FILE", help="TOML config (default: the embedded one)")
    parser.add_argument("--socket", metavar="PATH", help="control socket path")
    parser.add_argument("--workers", type=int, metavar="N", help="CPU workers (0: one per CPU)")
    parser.add_argument(
        "--check-config",
        metavar="FILE",
        help="validate FILE, import its preload, task modules and pipelines (in child processes), exit",
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        help="default: $WORKERD_LOG_LEVEL, else info",
    )
    return parser


def log_level(option: str | None) -> str:
    """--log-level, else $WORKERD_LOG_LEVEL (checked like the option: a typo there is a config
    error, not a traceback that systemd restarts forever), else info."""
    if option is not None:
        return option
    level = os.environ.get("WORKERD_LOG_LEVEL") or "info"
    if level.lower() not in LOG_LEVELS:
        raise config.ConfigError(f"WORKERD_LOG_LEVEL: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level.lower()


def check_config(path: str) -> int:
    searched: list[str] = []
    try:
        problems, searched = importcheck.check(config.load(path))
    except config.ConfigError as exc:
        problems = [str(exc)]
    for problem in problems:
        print(f"workerd: {problem}", file=sys.stderr)
    shown = f"task code is searched for in (sys.path, [tasks] path first): {os.pathsep.join(searched)}"
    if problems:
        if searched:
            print(f"workerd: {path}: {shown}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{path}: ok")
    print(f"{path}: {shown}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers is not None and args.workers < 0:
        print("workerd: --workers must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    if args.check_config:
        return check_config(args.check_config)
    try:
        level = log_level(args.log_level)
    except config.ConfigError as exc:
        print(f"workerd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(level)
    overrides = {"socket": args.socket, "workers": args.workers}
    try:
        settings = load_config(args.config, overrides)
    except config.ConfigError as exc:
        print(f"workerd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return Master(settings, args.config, overrides).run()
    except control.ControlSocketError as exc:
        print(f"workerd: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
