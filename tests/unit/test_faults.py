"""WORKERD_FAULTS: what each setting fails, and in which order."""

from __future__ import annotations

import errno

import pytest

from workerd import faults


def test_counts_and_skips() -> None:
    assert faults.parse("spawn=EAGAIN:2@1,fork=ENOMEM") == {
        "spawn": [faults.PASS, errno.EAGAIN, errno.EAGAIN],
        "fork": [errno.ENOMEM],
    }
    assert faults.parse("") == {}


@pytest.mark.parametrize("text", ["spawn", "spawn=EFOO", "exec=EAGAIN", "spawn=EAGAIN:x", "spawn=EAGAIN@"])
def test_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="WORKERD_FAULTS"):
        faults.parse(text)
