"""Shared test fixtures: the golden vectors, the published PyTorch reference model, and a tiny
embedded dataset per test module."""

import importlib.util
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("CRATE_SHARED_DIR", REPO.parent / "shared"))


def _require(path: pathlib.Path, what: str) -> pathlib.Path:
  if path.exists():
    return path
  message = f"{what} not found at {path}; set CRATE_SHARED_DIR to the folder holding golden/ and reference/."
  if os.environ.get("CRATE_REQUIRE_SHARED"):  # CI: never skip the golden tests silently.
    pytest.fail(message)
  pytest.skip(message)


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
  return _require(SHARED / "golden", "Golden vectors")


@pytest.fixture(scope="session")
def torch_reference():
  """The published-code PyTorch CRATE (`shared/reference/torch_crate.py`), or skip without torch."""
  pytest.importorskip("torch")
  path = _require(SHARED / "reference" / "torch_crate.py", "PyTorch reference model")
  spec = importlib.util.spec_from_file_location("torch_crate", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def data_dir(request, tmp_path_factory) -> pathlib.Path:
  """A tfds data_dir holding the module's `TINY` crate_shapes config, built once per module."""
  from crate_jax.data import crate_shapes  # pylint: disable=g-import-not-at-top

  path = tmp_path_factory.mktemp("tfds")
  crate_shapes.build(request.module.TINY, path)
  return path
