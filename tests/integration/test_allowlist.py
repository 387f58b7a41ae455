"""The task allow-list on a real daemon: only public functions defined in an allowed module run.

A review reproduced against the daemon that any callable attribute of an allowed module ran:
`moda:__setattr__` changed a global that other callers' tasks read, `__delattr__`,
`__getattribute__("__file__")`, `__dir__` and `__init__` ran, and so did private helpers and
names the module imports (`from os import system` made `moda:system` callable).
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import BASE_CONFIG, Daemon
from workerctl import errors
from workerd.examples import tasks as examples

EXAMPLES = "workerd.examples.tasks"
MODA = textwrap.dedent("""
    import functools
    from os import system, getpid
    from os.path import join

    VALUE = "original"

    def read():
        return VALUE

    def numbers(n):
        yield from range(n)

    def _private():
        return "private"

    def logged(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            return function(*args, **kwargs)
        return wrapper

    @logged
    def decorated(x):
        return x + 1

    class Thing:
        def __call__(self):
            return "instance"

    thing = Thing()
    method = "text".upper
    cached = functools.lru_cache(maxsize=None)(read)
""")
# A module that names its tasks itself: exactly these run, re-exports included.
MODX = textwrap.dedent("""
    from os import getpid
    from moda import read

    __workerd_tasks__ = ["getpid", "own"]

    def own():
        return "own"

    def unlisted():
        return "unlisted"
""")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("allowlist")
    (directory / "moda.py").write_text(MODA)
    (directory / "modx.py").write_text(MODX)
    config = BASE_CONFIG.format(workers=1).replace(
        f'modules = ["{EXAMPLES}"]', f'modules = ["{EXAMPLES}", "moda", "modx"]'
    )
    daemon = Daemon(directory, config, [], {"PYTHONPATH": str(directory)}, None)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()


REFUSED = [
    # (name, args, error, fragment); the master refuses private names before queuing, the
    # worker refuses the rest once it has looked at the object.
    ("moda:__setattr__", ["VALUE", "changed"], errors.Denied, "is private"),
    ("moda:__delattr__", ["VALUE"], errors.Denied, "is private"),
    ("moda:__getattribute__", ["__file__"], errors.Denied, "is private"),
    ("moda:__dir__", [], errors.Denied, "is private"),
    ("moda:__init__", ["moda"], errors.Denied, "is private"),
    ("moda:_private", [], errors.Denied, "is private"),
    ("moda:system", ["true"], errors.Denied, "is imported from 'posix'"),
    ("moda:getpid", [], errors.Denied, "is imported from 'posix'"),
    ("moda:join", ["a", "b"], errors.Denied, "is imported from 'posixpath'"),
    ("moda:functools", [], errors.Denied, "is a module, not a function"),
    ("moda:Thing", [], errors.Denied, "is a type, not a function"),
    ("moda:thing", [], errors.Denied, "is a Thing, not a function"),
    ("moda:method", [], errors.Denied, "is a builtin_function_or_method, not a function"),
    ("moda:cached", [], errors.Denied, "not a function"),
    ("moda:VALUE", [], errors.Denied, "is a str, not a function"),
    ("moda:len", [], errors.UnknownTask, "has no attribute 'len'"),
    ("modx:unlisted", [], errors.Denied, "is not listed in modx.__workerd_tasks__"),
    ("modx:read", [], errors.Denied, "is not listed in modx.__workerd_tasks__"),
]


def test_only_public_functions_defined_in_the_module_run(daemon: Daemon) -> None:
    outcomes: dict[str, Any] = {}
    with daemon.client() as client:
        for name, args, _, _ in REFUSED:
            try:
                outcomes[name] = ("ran", client.execute(name, *args))
            except errors.WorkerdError as exc:
                outcomes[name] = exc
        # __setattr__ and __delattr__ were refused: the global every caller reads is untouched.
        assert client.execute("moda:read") == "original"
    for name, _, error, fragment in REFUSED:
        outcome = outcomes[name]
        assert isinstance(outcome, error), (name, outcome)
        assert fragment in outcome.message, (name, outcome.message)


def test_functions_generators_and_exported_names_run(daemon: Daemon) -> None:
    with daemon.client() as client:
        assert client.execute("moda:read") == "original"
        assert list(client.stream("moda:numbers", args=[3])) == [0, 1, 2]
        assert client.execute("moda:decorated", 1) == 2  # functools.wraps keeps __module__
        assert client.execute("modx:own") == "own"
        worker = client.status()["pool"]["workers"][0]["pid"]
        assert client.execute("modx:getpid") == worker  # imported, but listed: it runs


def test_every_bundled_example_still_runs(daemon: Daemon) -> None:
    arguments: dict[str, dict[str, Any]] = {
        "sleep": {"seconds": 0},
        "hash_work": {"rounds": 10},
        "leak": {"mb": 1},
        "payload": {"size": 3},
    }
    names = [
        name
        for name, value in vars(examples).items()
        if inspect.isfunction(value) and value.__module__ == EXAMPLES and not name.startswith("_")
    ]
    assert {"echo", "count", "fail", "crash"} <= set(names)
    failures = {"fail": errors.TaskError, "crash": errors.WorkerLost}  # they ran: that is their job
    with daemon.client() as client:
        for name in names:
            kwargs = arguments.get(name, {})
            if name in failures:
                with pytest.raises(failures[name]):
                    client.execute(f"{EXAMPLES}:{name}", **kwargs)
            elif name == "count":
                assert list(client.stream(f"{EXAMPLES}:count", kwargs={"n": 2})) == [1, 2]
            else:
                client.execute(f"{EXAMPLES}:{name}", **kwargs)
