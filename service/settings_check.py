"""What is wrong with an operator's settings, in words, before anything starts.

`Settings` validates types and ranges; this adds what a type cannot say: the variable's name
(`MCSERVE_MAX_INSTANCES`, not `max_instances`), JSON that does not parse, a model directory that
is not there, a device this machine lacks, audit settings that cannot work, and variables that
look like settings but are none (a typo is otherwise silently ignored). Errors stop `serve`
(exit 2); warnings are printed and it starts.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from typing import Any, get_origin

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.errors import shown_name
from service.settings import Settings

PREFIX = "MCSERVE_"
# Kubernetes sets <SERVICE>_SERVICE_HOST, <SERVICE>_PORT=tcp://... and <SERVICE>_PORT_8000_TCP...
# for a Service named "mcserve" (or "mcserve-predictor", KServe's): not settings, not typos.
_KUBERNETES = re.compile(
    r"^MCSERVE_(?:\w+_)?(?:SERVICE_HOST|SERVICE_PORT(?:_\w+)?|PORT_\d+_(?:TCP|UDP|SCTP)\w*)$"
)
# <SERVICE>_PORT alone is Kubernetes' only by its value (MCSERVE_METRICS_PORT=9090 is a typo).
_KUBERNETES_PORT = re.compile(r"^MCSERVE_(?:\w+_)?PORT$")
_SERVICE_URL = re.compile(r"^(?:tcp|udp|sctp)://", re.IGNORECASE)
# The project's own variables that are not the server's: the data set's directory for `make
# models`, the tests' PostgreSQL and the pages' screenshots.
_OTHERS = {"MCSERVE_MEDICAL_ABSTRACTS", "MCSERVE_TEST_POSTGRES_URL", "MCSERVE_SCREENSHOTS"}
_FLAGS = {f: "--" + f.replace("_", "-") for f in ("host", "port", "model_dir", "log_level")}


def variable(field: str) -> str:
    """The environment variable of a settings field (and its flag, where `serve` has one)."""
    flag = _FLAGS.get(field)
    return PREFIX + field.upper() + (f" ({flag})" if flag else "")


def problems(overrides: Mapping[str, Any], serve: bool = True) -> tuple[list[str], list[str]]:
    """(errors, warnings) of the settings `Settings(**overrides)` reads (flags over MCSERVE_*
    variables of this process's environment). `serve=False`: values that do not parse only,
    not what a server needs (its device, audit store, required models: `predict` needs none)."""
    # A variable that is no setting may explain an error (a typo of the one it meant): said with
    # the errors too, not only when the settings parse (`predict` passes serve=False).
    unknown = _unknown(os.environ) if serve else []
    try:
        s = Settings(**overrides)
    except SettingsError as exc:  # a JSON-typed variable that is not JSON
        return [_not_json(str(exc))], unknown
    except ValidationError as exc:
        errors = []
        for err in exc.errors(include_url=False, include_input=False):
            field = str(err["loc"][0]) if err["loc"] else ""
            rest = ".".join(str(p) for p in err["loc"][1:])
            where = (variable(field) + (f" [{rest}]" if rest else "") + ": ") if field else ""
            errors.append(f"{where}{err['msg'].removeprefix('Value error, ')}")
        return errors, unknown
    if not serve:
        return [], []
    errors, warnings = _checks(s)
    return errors, warnings + unknown


def _not_json(message: str) -> str:
    found = re.search(r'field "(\w+)"', message)
    field = found.group(1) if found else ""
    kind = "a JSON object" if get_origin(_annotation(field)) is dict else "a JSON list"
    return (
        f"{variable(field) if field else 'a setting'}: not valid JSON; this setting is {kind} "
        "(in a shell, quote it in single quotes, e.g. MCSERVE_CORS_ORIGINS='[\"https://ehr."
        "example\"]')"
    )


def _annotation(field: str) -> Any:
    info = Settings.model_fields.get(field)
    return None if info is None else info.annotation


def _checks(s: Settings) -> tuple[list[str], list[str]]:
    errors: list[str] = []
    warnings: list[str] = []
    d = s.model_dir
    # With polling or the load API, bundles may come later, into a directory made later (a
    # sidecar's volume): a warning. Without, nothing would ever be served: an error.
    later = s.model_control != "none"
    if not d.exists():
        (warnings if later else errors).append(
            f"{variable('model_dir')}: {d} does not exist; give the model repository"
        )
    elif not d.is_dir():
        errors.append(f"{variable('model_dir')}: {d} is a file, not a model repository")
    else:
        names = {p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")}
        if not names:
            until = (
                f"until bundles appear (checked every {s.poll_interval_s:g} s)"
                if s.model_control == "poll"
                else f"({variable('model_control')} is {s.model_control}: bundles added later "
                "are not picked up by themselves)"
            )
            warnings.append(
                f"{variable('model_dir')}: {d} holds no model; the server is ready with none "
                f"{until}"
            )
        if missing := sorted(set(s.required_models or []) - names):
            # /readyz stays 503 for it: with maxUnavailable 0 a rollout stalls, and said nothing.
            later = s.model_control != "none"
            (warnings if later else errors).append(
                f"{variable('required_models')} names {', '.join(map(repr, missing))}, not a "
                f"model under {d}: /readyz answers 503 until "
                + ("one of that name is loaded" if later else "the server restarts with it")
            )
        if unknown := sorted(set(s.referral) - names):
            warnings.append(
                f"{variable('referral')} names {', '.join(map(repr, unknown))}, not a model "
                f"under {d}: its overrides apply to no model until one of that name appears"
            )
    errors += _referral_problems(s) + [
        f"{variable('pinned_digests')}: {shown_name(d)!r} is not a bundle digest (sha256: and "
        "64 lowercase hex digits, as GET /v1/models/{name} shows it)"
        for d in s.pinned_digests
        if not DIGEST.fullmatch(d)
    ]  # each refused every bundle, the server up and never ready
    if s.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            errors.append(
                f"{variable('device')}: cuda, but this machine or this torch build has no CUDA "
                "device; use cpu, or auto (CUDA when present)"
            )
    if s.audit:
        url = s.audit_url
        if url and not url.startswith(("postgresql://", "postgres://")):
            from service.audit.postgres import is_url, redact

            # Its first 20 characters were shown: "admin:S3cret@db:5432/a" put a password in
            # the log. As the store says it: passwords out, a keyword string not at all.
            got = repr(redact(url)) if is_url(url) else "a value that is not a URL (not shown)"
            errors.append(
                f"{variable('audit_url')}: a postgresql:// URL (or empty for SQLite at "
                f"{variable('audit_path')}), got {got}"
            )
        where = s.audit_path.resolve().parent
        if not url and not (where.is_dir() and os.access(where, os.W_OK | os.X_OK)):
            # A read-only root filesystem (the manifests') crash-looped at the first write.
            errors.append(
                f"{variable('audit_path')}: the SQLite file's directory {where} is not a "
                "writable directory; mount a volume there and point this setting at it, or set "
                f"{variable('audit_url')} to a PostgreSQL URL"
            )
        if s.audit_inputs == "hmac" and s.audit_hmac_key is None:
            errors.append(
                f"{variable('audit_inputs')}: hmac needs a key; set {variable('audit_hmac_key')}"
            )
    if (s.protect_metrics or s.protect_docs) and not s.api_keys:
        # Asked for and not given: /metrics and /docs stayed open without a word.
        asked = [variable(f) for f in ("protect_metrics", "protect_docs") if getattr(s, f)]
        errors.append(
            f"{' and '.join(asked)}: nothing to protect with, {variable('api_keys')} is empty; "
            "set API keys, or leave these off"
        )
    if s.max_concurrency is not None and s.max_pending_connections >= s.max_concurrency:
        # Idle keep-alive connections (a load balancer's pool) wait for a head and count toward
        # the cap: up to the pending cap of them took every place, /readyz 200 (review SRE).
        errors.append(
            f"{variable('max_concurrency')} ({s.max_concurrency}) must be above "
            f"{variable('max_pending_connections')} ({s.max_pending_connections}): idle "
            "keep-alive connections, up to the pending cap, count toward it and could refuse "
            "every request; lower the pending cap (e.g. to half of it) or raise the concurrency"
        )
    if s.max_inflight_body_bytes is not None and s.max_inflight_body_bytes < 2 * s.max_body_bytes:
        # A gzip body holds its wire bytes and what they inflate to at once: below twice the
        # body limit a request within it could be refused on an idle server, every retry too.
        errors.append(
            f"{variable('max_inflight_body_bytes')} ({s.max_inflight_body_bytes}) must be at "
            f"least twice {variable('max_body_bytes')} ({s.max_body_bytes}), so that one "
            "request within the body limit is always taken when no other is in flight; raise it "
            "or lower the body limit"
        )
    if s.cds_mapping_dir is not None and not s.cds_mapping_dir.is_dir():
        warnings.append(
            f"{variable('cds_mapping_dir')}: {s.cds_mapping_dir} is not a directory; no model "
            "gets a CDS Hooks service"
        )
    return errors, warnings


def _unknown(environ: Mapping[str, str]) -> list[str]:
    known = {PREFIX + f.upper() for f in Settings.model_fields}
    out = []
    spellings: dict[str, list[str]] = {}
    for name in environ:
        if name.upper() in known:
            spellings.setdefault(name.upper(), []).append(name)
    for upper, names in sorted(spellings.items()):
        if len(names) > 1:  # read whatever the case: which one wins is the environment's order
            out.append(
                f"{upper} is set {len(names)} times in different cases ({', '.join(sorted(names))})"
                "; one of them is read, which is not defined: keep one"
            )
    for name in sorted(environ):
        upper = name.upper()  # settings are read whatever the case: MCSERVE_Max_Instances is one
        if not upper.startswith(PREFIX) or upper in known | _OTHERS or _KUBERNETES.match(upper):
            continue
        if _KUBERNETES_PORT.match(upper) and _SERVICE_URL.match(environ[name]):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        out.append(f"{name} is not a setting of mcserve{hint}; it is ignored")
    return out


DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _referral_problems(s: Settings) -> list[str]:
    """Each model's MCSERVE_REFERRAL overrides, validated as a manifest's referral section is
    (a wrong value refused every version of that model at load, the server never ready)."""
    from service.bundle.calibration import ReferralPolicy

    out = []
    for name, overrides in s.referral.items():
        try:
            ReferralPolicy.model_validate({**ReferralPolicy().model_dump(), **overrides})
        except ValidationError as exc:
            for e in exc.errors(include_url=False):
                where = ".".join(str(p) for p in (name, *e["loc"]))
                out.append(f"{variable('referral')} [{shown_name(where)}]: {e['msg']}")
    return out
