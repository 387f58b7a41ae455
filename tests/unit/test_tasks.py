"""Which names of a module are tasks (tasks.task_function, tasks.check_allowed), on modules
built in memory."""

from __future__ import annotations

import os
import types

import pytest

from workerctl import protocol
from workerd.tasks import TaskLookupError, check_allowed, task_function


def module(name: str, source: str) -> types.ModuleType:
    made = types.ModuleType(name)
    exec(compile(source, f"<{name}>", "exec"), vars(made))
    return made


PLAIN = """
from os import getpid

def task():
    return 1

def __getattr__(name):  # PEP 562: getattr(module, anything) would call this
    return print
"""


def refusal(mod: types.ModuleType, name: str) -> TaskLookupError:
    with pytest.raises(TaskLookupError) as info:
        task_function(mod, name)
    return info.value


def test_a_function_defined_in_the_module_is_a_task() -> None:
    mod = module("plain", PLAIN)
    assert task_function(mod, "task")() == 1


def test_imported_and_invented_names_are_not() -> None:
    mod = module("plain", PLAIN)
    assert refusal(mod, "getpid").code == protocol.DENIED
    # The module's namespace is what counts: __getattr__ is never asked.
    assert refusal(mod, "anything").code == protocol.UNKNOWN_TASK


def test_an_export_list_is_the_whole_list() -> None:
    mod = module(
        "listed",
        "from os import getpid\n__workerd_tasks__ = ['getpid', 'Klass']\n"
        "class Klass: pass\ndef own(): pass\n",
    )
    assert task_function(mod, "getpid") is os.getpid  # listed: an imported name runs
    assert refusal(mod, "own").code == protocol.DENIED  # defined here, but not listed
    assert "not a function" in refusal(mod, "Klass").message


def test_a_malformed_export_list_refuses_everything() -> None:
    mod = module("broken", "__workerd_tasks__ = 'own'\ndef own(): pass\n")
    assert "must be a list of function names" in refusal(mod, "own").message


@pytest.mark.parametrize("function", ["_helper", "__setattr__", "__dir__", "__init__"])
def test_the_master_refuses_private_names_by_their_name(function: str) -> None:
    with pytest.raises(TaskLookupError) as info:
        check_allowed(f"mod:{function}", {"mod"})
    assert info.value.code == protocol.DENIED and "is private" in info.value.message
    assert check_allowed("mod:public", {"mod"}) == ("mod", "public")
