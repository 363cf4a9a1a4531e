"""Fixtures for the virtio tests (helpers live in ``virtio_helpers``)."""

import pytest

from tests.virtio.virtio_helpers import FakeImage, Stack


@pytest.fixture
def fake():
    return FakeImage()


@pytest.fixture
def stack(fake):
    return Stack(fake)
