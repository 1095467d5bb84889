"""Fixtures. The integration tests need a running `coordinator serve --dev` and its
credentials in the environment (scripts/client-tests.sh provides both); without them
they fail — they never skip."""
from __future__ import annotations

import json
import os
import pathlib
import uuid
from typing import Any, Dict

import pytest

from coordinator_client import Client

ROOT = pathlib.Path(__file__).resolve().parents[3]
VECTORS = pathlib.Path(os.environ.get("COORDINATOR_SIGNING_VECTORS", ROOT / "docs" / "signing-vectors.json"))


@pytest.fixture(scope="session")
def vectors() -> Dict[str, Any]:
    return json.loads(VECTORS.read_text(encoding="utf-8"))


class Env(dict):  # type: ignore[type-arg]
    """The dev credentials; never shown in a failure report."""

    def __repr__(self) -> str:
        return f"Env({sorted(self)})"


@pytest.fixture(scope="session")
def env() -> Dict[str, str]:
    need = [
        "COORDINATOR_URL",
        "COORDINATOR_CALLER",
        "COORDINATOR_HMAC_SECRET",
        "COORDINATOR_CLIENT_API_KEY",
        "COORDINATOR_WEBHOOK_SECRET",
    ]
    missing = [n for n in need if not os.environ.get(n)]
    if missing:
        pytest.fail(
            f"no dev server: {', '.join(missing)} unset (run scripts/client-tests.sh)",
            pytrace=False,
        )
    return Env({n: os.environ[n] for n in need})


@pytest.fixture(scope="session")
def client(env: Dict[str, str]) -> Client:
    return Client(env["COORDINATOR_URL"], env["COORDINATOR_CALLER"], env["COORDINATOR_HMAC_SECRET"])


@pytest.fixture(scope="session")
def key_client(env: Dict[str, str]) -> Client:
    return Client(env["COORDINATOR_URL"], api_key=env["COORDINATOR_CLIENT_API_KEY"])


@pytest.fixture
def queue() -> str:
    """A queue of this test's own, so tests never claim each other's jobs."""
    return "t-" + uuid.uuid4().hex[:12]
