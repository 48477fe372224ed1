"""The search service against its own OpenAPI schema, checked by an outside tool: schemathesis ``--checks all``.

The app over the word-overlap :class:`serve_fixtures.CataloguePipeline` is served by uvicorn on 127.0.0.1 (a
port the OS picked), and ``st run URL/openapi.json`` generates positive and negative requests for every
operation (examples, coverage and fuzzing phases; a fixed seed, at most 25 cases per operation, one worker, no
example database) and runs every check: no 5xx, every status and content type documented, responses match their
schemas, schema-valid requests accepted, schema-violating ones refused. ``tests/schemathesis_hooks.py`` gives
the upload endpoints decodable images (a schema cannot say "a JPEG of at least 16 px a side") and drops one kind
of false report only after re-checking the body as sent. One setting departs from the tool's defaults: a 413
counts as refusing a schema-violating request (the service answers a text over its ``maxLength`` with 413, as
the README promises; schemathesis's default list of refusals omits 413). The tool runs in its own process, in a
temporary working directory (where that setting is written as ``schemathesis.toml``), so it writes nothing into
the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from browser import serve_in_thread

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
pytest.importorskip("schemathesis", reason="the dev extra (schemathesis) is not installed")

from kaleido_bert.serve.app import create_app  # noqa: E402
from serve_fixtures import CataloguePipeline  # noqa: E402

HOOKS = Path(__file__).resolve().parent / "schemathesis_hooks.py"
MAX_EXAMPLES = 25
SEED = 0
CONFIG = """\
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
"""

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def server(catalogue_root) -> Iterator[str]:
    app = create_app(CataloguePipeline(catalogue_root), catalogue_root=catalogue_root, max_upload_bytes=200_000,
                     max_query_chars=64, max_k=20)
    with serve_in_thread(app) as url:
        yield url


def test_schemathesis_finds_no_failures(server, tmp_path):
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{server}/openapi.json", "--checks", "all",
               "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
               "--generation-database", "none", "--request-timeout", "20", "--no-color",
               "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml")]
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "NO_COLOR": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=200)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "Tested: 7" in output, output[-3000:]  # every operation of the schema was exercised
    summary = output[output.rfind("Test cases:"):]
    assert " passed" in summary and "fail" not in summary and "error" not in summary.lower(), summary
    report = (tmp_path / "junit.xml").read_text()
    assert 'failures="0"' in report and 'errors="0"' in report, report[:2000]
