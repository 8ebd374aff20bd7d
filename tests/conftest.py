import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# The suite's latency readings calibrate their own scale (harness.measurement.calibration), shared by the
# session's processes and never by the user's searches on this machine.
os.environ.setdefault(
    "SNED_LATENCY_CALIBRATION",
    os.path.join(tempfile.mkdtemp(prefix="sned-tests-"), "latency-calibration.json"),
)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Give every parameter random values (zero-initialised branches would make tests vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.dim() == 1 and scale < 0 else 0.0))
    return module


@pytest.fixture(scope="session")
def tiny_nets():
    """The ``tiny`` preset of every registered family, with random weights."""
    from search_spaces import build_supernet, list_families

    return {fam: randomize_(build_supernet(fam, "tiny"), seed=i) for i, fam in enumerate(list_families())}


@pytest.fixture
def postgres_url():
    """A fresh database on the local PostgreSQL server (127.0.0.1:5432, trust auth), dropped afterwards.
    Skipped when the server is not reachable, except in CI (``CI=true``), where that is a failure."""
    import uuid

    psycopg2 = pytest.importorskip("psycopg2")
    name = f"sned_test_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test")
    except psycopg2.OperationalError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but PostgreSQL on 127.0.0.1:5432 is not reachable: {e}")
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 is not reachable: {e}")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    admin.cursor().execute(f"DROP DATABASE {name} WITH (FORCE)")
    admin.close()
