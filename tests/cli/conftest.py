"""Fixtures for the command-line tests (the helpers themselves live in ``clitools``)."""

import pytest

from tests.cli.clitools import run_cli, run_cmd


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def cmd():
    return run_cmd
