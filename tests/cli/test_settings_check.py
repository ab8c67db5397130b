"""Operator mistakes in settings say which variable and what to set (service/settings_check.py).

Each case was found by starting `serve` with it: a traceback, a silent start, or a hang."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.settings import Settings
from service.settings_check import problems

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _only_these_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("MCSERVE_"):
            monkeypatch.delenv(k)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "diabetes").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    ("env", "error"),
    [
        (
            {"MCSERVE_REFERRAL": "{diabetes: 1"},
            "MCSERVE_REFERRAL: not valid JSON; this setting is a JSON object (in a shell, quote "
            "it in single quotes, e.g. MCSERVE_CORS_ORIGINS='[\"https://ehr.example\"]')",
        ),
        (
            {"MCSERVE_CORS_ORIGINS": "https://ehr.example"},
            "MCSERVE_CORS_ORIGINS: not valid JSON; this setting is a JSON list",
        ),
        (
            {"MCSERVE_MAX_INSTANCES": "0"},
            "MCSERVE_MAX_INSTANCES: Input should be greater than or equal to 1",
        ),
        ({"MCSERVE_MAX_DELAY_MS": "inf"}, "MCSERVE_MAX_DELAY_MS: Input should be a finite number"),
        # a finite typo of years hung every request (no upper bound)
        ({"MCSERVE_MAX_DELAY_MS": "1e12"}, "MCSERVE_MAX_DELAY_MS: Input should be less than or"),
        ({"MCSERVE_MAX_SAMPLES": "2000000"}, "MCSERVE_MAX_SAMPLES: Input should be less than or"),
        ({"MCSERVE_PORT": "tcp://10.0.0.1:8000"}, "MCSERVE_PORT (--port): Input should be a"),
        (
            {"MCSERVE_AUDIT": "true", "MCSERVE_AUDIT_URL": "mysql://u@127.0.0.1/db"},
            "MCSERVE_AUDIT_URL: a postgresql:// URL (or empty for SQLite at MCSERVE_AUDIT_PATH), "
            "got 'mysql://u@127.0.0.1/db'",
        ),
        (
            {"MCSERVE_AUDIT": "true", "MCSERVE_AUDIT_INPUTS": "hmac"},
            "MCSERVE_AUDIT_INPUTS: hmac needs a key; set MCSERVE_AUDIT_HMAC_KEY",
        ),
        # uvicorn reads 0 as no limit: a drain that always ended in the kubelet's SIGKILL.
        (
            {"MCSERVE_DRAIN_TIMEOUT_S": "0"},
            "MCSERVE_DRAIN_TIMEOUT_S: Input should be greater than 0",
        ),
        # Idle keep-alive connections (up to the pending cap) took every place: all 503.
        (
            {"MCSERVE_MAX_CONCURRENCY": "50"},
            "MCSERVE_MAX_CONCURRENCY (50) must be above MCSERVE_MAX_PENDING_CONNECTIONS (256): "
            "idle keep-alive connections",
        ),
        # Below twice the body limit, a gzip body within it was refused on an idle server.
        (
            {"MCSERVE_MAX_BODY_BYTES": "1048576", "MCSERVE_MAX_INFLIGHT_BODY_BYTES": "2097151"},
            "MCSERVE_MAX_INFLIGHT_BODY_BYTES (2097151) must be at least twice "
            "MCSERVE_MAX_BODY_BYTES (1048576)",
        ),
    ],
    ids=[
        "json-object",
        "json-list",
        "range",
        "infinite",
        "years",
        "past-the-counter",
        "kubernetes-port",
        "audit-url",
        "hmac",
        "no-drain-limit",
        "concurrency-under-pending",
        "inflight-under-twice-the-body",
    ],
)
def test_a_wrong_setting_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, repo: Path, env: dict[str, str], error: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    errors, _ = problems({"model_dir": repo})
    assert len(errors) == 1 and errors[0].startswith(error), errors


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("admin:S3cretPw@db:5432/audit", "a value that is not a URL (not shown)"),
        ("password=S3cretPw host=db", "a value that is not a URL (not shown)"),
        ("mysql://admin:S3cretPw@db/audit", "'mysql://admin:***@db/audit'"),
    ],
)
def test_a_wrong_audit_url_never_shows_its_password(
    monkeypatch: pytest.MonkeyPatch, repo: Path, url: str, shown: str
) -> None:
    """Its first 20 characters were shown: a URL without its scheme put the password in the
    start-up error (and the log)."""
    monkeypatch.setenv("MCSERVE_AUDIT", "true")
    monkeypatch.setenv("MCSERVE_AUDIT_URL", url)
    errors, _ = problems({"model_dir": repo})
    assert len(errors) == 1 and errors[0].endswith(f"got {shown}"), errors
    assert "S3cret" not in errors[0]


def test_the_model_directory_must_be_there(tmp_path: Path) -> None:
    missing, afile, empty = tmp_path / "nope", tmp_path / "f", tmp_path / "empty"
    afile.write_text("x")
    empty.mkdir()
    assert problems({"model_dir": missing})[0] == [
        f"MCSERVE_MODEL_DIR (--model-dir): {missing} does not exist; give the model repository"
    ]
    assert problems({"model_dir": afile})[0] == [
        f"MCSERVE_MODEL_DIR (--model-dir): {afile} is a file, not a model repository"
    ]
    assert problems({"model_dir": empty}) == (
        [],
        [
            f"MCSERVE_MODEL_DIR (--model-dir): {empty} holds no model; the server is ready with "
            "none (MCSERVE_MODEL_CONTROL is none: bundles added later are not picked up by "
            "themselves)"
        ],
    )


def test_a_referral_override_for_no_model_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, repo: Path
) -> None:
    monkeypatch.setenv("MCSERVE_REFERRAL", '{"diabets": {"epistemic": 30}, "diabetes": {}}')
    assert problems({"model_dir": repo}) == (
        [],
        [f"MCSERVE_REFERRAL names 'diabets', not a model under {repo}: its overrides apply to "
         "no model until one of that name appears"],
    )  # fmt: skip


def test_referral_overrides_and_pinned_digests_are_checked_at_start(
    monkeypatch: pytest.MonkeyPatch, repo: Path
) -> None:
    """Each started the server, which then refused every version of the model (or every
    bundle) at load and never became ready."""
    monkeypatch.setenv("MCSERVE_REFERRAL", '{"diabetes": {"epistemic": "x", "foo": 1}}')
    digest = "sha256:" + "ab" * 32
    monkeypatch.setenv("MCSERVE_PINNED_DIGESTS", f'["abc", "{digest}"]')
    errors, _ = problems({"model_dir": repo})
    assert errors == [
        "MCSERVE_REFERRAL [diabetes.epistemic]: Input should be a valid number, unable to parse "
        "string as a number",
        "MCSERVE_REFERRAL [diabetes.foo]: Extra inputs are not permitted",
        "MCSERVE_PINNED_DIGESTS: 'abc' is not a bundle digest (sha256: and 64 lowercase hex "
        "digits, as GET /v1/models/{name} shows it)",
    ]


def test_a_required_model_that_is_not_there_is_said(
    monkeypatch: pytest.MonkeyPatch, repo: Path
) -> None:
    """A misspelt required model passed the check, and /readyz answered 503 for good: with
    maxUnavailable 0, a rollout stalled without a word at the start."""
    monkeypatch.setenv("MCSERVE_REQUIRED_MODELS", '["diabets", "diabetes"]')
    said = (
        f"MCSERVE_REQUIRED_MODELS names 'diabets', not a model under {repo}: /readyz answers "
        "503 until "
    )
    assert problems({"model_dir": repo}) == ([said + "the server restarts with it"], [])
    monkeypatch.setenv("MCSERVE_MODEL_CONTROL", "poll")
    assert problems({"model_dir": repo}) == ([], [said + "one of that name is loaded"])


def test_an_audit_file_where_nothing_can_be_written_is_said(
    monkeypatch: pytest.MonkeyPatch, repo: Path, tmp_path: Path
) -> None:
    """The image's working directory is on a read-only root filesystem in every manifest: the
    default audit.db there passed the check, and the server failed at its first write."""
    monkeypatch.setenv("MCSERVE_AUDIT", "true")
    nowhere = tmp_path / "absent" / "audit.db"
    monkeypatch.setenv("MCSERVE_AUDIT_PATH", str(nowhere))
    assert problems({"model_dir": repo})[0] == [
        f"MCSERVE_AUDIT_PATH: the SQLite file's directory {nowhere.parent} is not a writable "
        "directory; mount a volume there and point this setting at it, or set "
        "MCSERVE_AUDIT_URL to a PostgreSQL URL"
    ]
    monkeypatch.setenv("MCSERVE_AUDIT_PATH", str(tmp_path / "audit.db"))
    assert problems({"model_dir": repo})[0] == []


def test_with_polling_a_missing_directory_may_come_later(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MCSERVE_MODEL_CONTROL", "poll")
    missing = tmp_path / "later"
    assert problems({"model_dir": missing}) == (
        [],
        [f"MCSERVE_MODEL_DIR (--model-dir): {missing} does not exist; give the model repository"],
    )
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / "..data").mkdir()  # what a Kubernetes volume holds: not a model
    assert "holds no model" in problems({"model_dir": tmp_path / "hidden"})[1][0]


def test_cuda_without_cuda_is_refused(monkeypatch: pytest.MonkeyPatch, repo: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("MCSERVE_DEVICE", "cuda")
    assert problems({"model_dir": repo})[0] == [
        "MCSERVE_DEVICE: cuda, but this machine or this torch build has no CUDA device; use "
        "cpu, or auto (CUDA when present)"
    ]


def test_a_variable_that_is_no_setting_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, repo: Path
) -> None:
    monkeypatch.setenv("MCSERVE_REFERAL", "{}")
    monkeypatch.setenv("MCSERVE_SERVICE_HOST", "10.0.0.1")  # Kubernetes' own, for a Service
    monkeypatch.setenv("MCSERVE_PORT_8000_TCP_ADDR", "10.0.0.1")
    monkeypatch.setenv("MCSERVE_PREDICTOR_PORT", "tcp://10.0.0.2:80")  # KServe's Service
    monkeypatch.setenv("MCSERVE_TEST_POSTGRES_URL", "postgresql://127.0.0.1/t")  # the tests'
    # Read whatever its case: not ignored (it was said to be). A port that is no Service's.
    monkeypatch.setenv("MCSERVE_Max_Instances", "5")
    monkeypatch.setenv("MCSERVE_METRICS_PORT", "9090")
    assert problems({"model_dir": repo}) == (
        [],
        ["MCSERVE_METRICS_PORT is not a setting of mcserve (did you mean "
         "MCSERVE_METRICS_CREATED?); it is ignored",
         "MCSERVE_REFERAL is not a setting of mcserve (did you mean MCSERVE_REFERRAL?); it is "
         "ignored"],
    )  # fmt: skip


def test_one_setting_spelled_in_two_cases_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, repo: Path
) -> None:
    """Read whatever the case, the environment's order chose between them, silently (R9)."""
    monkeypatch.setenv("MCSERVE_MAX_INSTANCES", "5")
    monkeypatch.setenv("MCSERVE_max_instances", "7")
    assert problems({"model_dir": repo})[1] == [
        "MCSERVE_MAX_INSTANCES is set 2 times in different cases (MCSERVE_MAX_INSTANCES, "
        "MCSERVE_max_instances); one of them is read, which is not defined: keep one"
    ]


@pytest.mark.parametrize("protect", ["MCSERVE_PROTECT_METRICS", "MCSERVE_PROTECT_DOCS"])
def test_protection_without_api_keys_is_refused(
    monkeypatch: pytest.MonkeyPatch, repo: Path, protect: str
) -> None:
    """It left /metrics (or /docs) open without a word."""
    monkeypatch.setenv(protect, "true")
    assert problems({"model_dir": repo})[0] == [
        f"{protect}: nothing to protect with, MCSERVE_API_KEYS is empty; set API keys, or "
        "leave these off"
    ]


def test_serve_exits_2_with_the_line_and_no_traceback(repo: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCSERVE_")}
    env |= {"PYTHONPATH": str(ROOT), "MCSERVE_CORS_ORIGINS": "https://ehr.example"}
    env["MCSERVE_CORS_ORIGIN"] = "[]"  # a typo's warning explains an error: said before exit
    cmd = [sys.executable, "-m", "service", "serve", "--port", "0", "--model-dir", str(repo)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "error: invalid settings: MCSERVE_CORS_ORIGINS: not valid JSON" in done.stderr
    assert "warning: MCSERVE_CORS_ORIGIN is not a setting of mcserve" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_a_raised_body_limit_alone_raises_the_body_budget_with_it(
    monkeypatch: pytest.MonkeyPatch, repo: Path
) -> None:
    """A deployment that had raised MCSERVE_MAX_BODY_BYTES past 64 MiB stopped starting when
    the budget of body bytes in flight came, until it set that too (review K, D3)."""
    monkeypatch.setenv("MCSERVE_MAX_BODY_BYTES", "100000000")
    errors, _ = problems({"model_dir": repo})
    assert errors == []
    assert Settings(model_dir=repo).inflight_body_limit == 200_000_000
    monkeypatch.delenv("MCSERVE_MAX_BODY_BYTES")
    assert Settings(model_dir=repo).inflight_body_limit == 128 * 2**20
    monkeypatch.setenv("MCSERVE_MAX_INFLIGHT_BODY_BYTES", "50000000")
    assert Settings(model_dir=repo).inflight_body_limit == 50_000_000
