"""Tiny models here run on one intra-op thread (restored afterwards): much faster on a shared 2-core CPU."""

import pytest

from tests.tiny_sgtm import one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()
