"""Tests skip a case the installed libraries refuse, and only then: the skip needs memprof's rule for the
installed versions (compat.KNOWN_REFUSALS) *and* the library itself refusing when the rules are switched off,
with the rule's own message. A refusal no rule predicts, or a rule the library does not bear out, fails."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from memprof import compat
from memprof.config import RunSetup
from memprof.errors import LibraryRefusalError
from memprof.spec import ModelSpec


def skip_if_refused(spec: ModelSpec, setup: RunSetup, run: Callable[[], Any]) -> None:
    """If a rule says the installed libraries refuse (spec, setup): check that ``run()`` (which must call the
    library) raises that refusal with the rules off, then skip with the library's reason."""
    rule = compat.known_refusal(spec, setup)
    if rule is None:
        return
    saved = compat.KNOWN_REFUSALS
    compat.KNOWN_REFUSALS = ()
    try:
        with pytest.raises(LibraryRefusalError) as refused:
            run()
    finally:
        compat.KNOWN_REFUSALS = saved
    assert refused.value.library == rule.raised_by and refused.value.reason == rule.reason, refused.value
    pytest.skip(f"refused by the installed libraries: {refused.value}")
