"""Shared pytest fixtures."""

import gin
import pytest


@pytest.fixture(autouse=True)
def _clear_gin_config():
  """Every test starts and ends with an empty gin configuration."""
  gin.clear_config()
  yield
  gin.clear_config()
