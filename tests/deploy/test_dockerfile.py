"""The Dockerfile: hadolint-clean without blanket ignores, and the image contract in its text.

No image is built here (that is `make image` / `make image-smoke`, see docs/DEPLOY.md); these
checks read the Dockerfile, .dockerignore and pyproject.toml.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service.api.pages import evaluations

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT_CONFIGS = (".hadolint.yaml", ".hadolint.yml")
IGNORE_PRAGMA = re.compile(r"#\s*hadolint\s+(global\s+)?ignore=(\S+)")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(text: str) -> tuple[list[tuple[str, str]], list[Stage]]:
    """(instructions before the first FROM, stages); continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    preamble: list[tuple[str, str]] = []
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=words[0]))
        elif stages:
            stages[-1].instructions.append((keyword, args))
        else:
            preamble.append((keyword, args))
    return preamble, stages


@dataclass
class Dockerfile:
    preamble: list[tuple[str, str]]
    stages: dict[str, Stage]  # in file order: the last one is the default target


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    preamble, stages = parse(DOCKERFILE.read_text())
    return Dockerfile(preamble, {s.name: s for s in stages})


def lineage(stages: dict[str, Stage], name: str) -> list[tuple[str, str]]:
    """Every instruction that shapes a stage's image, its ancestors' first."""
    stage = stages[name]
    inherited = lineage(stages, stage.base) if stage.base in stages else []
    return inherited + stage.instructions


def test_hadolint_is_clean(hadolint: str, tmp_path: Path) -> None:
    # no user-level config or HADOLINT_* variable may relax the rules
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    run = subprocess.run(
        [hadolint, "--no-color", DOCKERFILE.name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (run.returncode, run.stdout + run.stderr) == (0, "")


def test_no_blanket_hadolint_ignores() -> None:
    for name in HADOLINT_CONFIGS:
        path = ROOT / name
        if path.exists():
            config = yaml.safe_load(path.read_text()) or {}
            relaxed = {"ignored", "failure-threshold", "override", "disable-ignore-pragma"}
            assert not relaxed & set(config), (
                f"{name} relaxes rules: {sorted(relaxed & set(config))}"
            )
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        match = IGNORE_PRAGMA.search(line)
        if not match:
            continue
        assert match.group(1) is None, f"line {number + 1}: a global ignore"
        assert all(re.fullmatch(r"(DL|SC)\d{4}", c) for c in match.group(2).split(","))
        # inline: the pragma sits right above the one instruction it covers, after a reason
        assert not lines[number + 1].lstrip().startswith("#"), f"line {number + 1}"
        assert lines[number - 1].lstrip().startswith("#"), f"line {number + 1}: no reason given"


def test_targets_and_base_image(dockerfile: Dockerfile) -> None:
    stages = dockerfile.stages
    # pinned by digest: a tag moves, a digest names one image (issue 27, finding 8)
    [base] = [a for kw, a in dockerfile.preamble if kw == "ARG" and a.startswith("BASE_IMAGE=")]
    assert re.fullmatch(r"BASE_IMAGE=python:3\.11-slim@sha256:[0-9a-f]{64}", base), base
    for stage in stages.values():
        assert stage.base in {"${BASE_IMAGE}", "scratch", *stages}, stage.base
    assert list(stages)[-1] == "cpu", "the default target (the last stage) is the CPU image"
    assert "cuda" in stages
    for target in ("cpu", "cuda"):
        assert stages[target].base in stages, target
        root = stages[target]
        while root.base in stages:
            root = stages[root.base]
        assert root.base == "${BASE_IMAGE}", target


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_final_image_contract(dockerfile: Dockerfile, target: str) -> None:
    instructions = lineage(dockerfile.stages, target)

    def last(keyword: str) -> str:
        values = [args for kw, args in instructions if kw == keyword]
        assert values, f"{target}: no {keyword}"
        return values[-1]

    user = last("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric non-root user (runAsNonRoot)"
    assert last("EXPOSE") == "8080"
    env = " ".join(args for kw, args in instructions if kw == "ENV")
    assert "MCSERVE_PORT=8080" in env.split() and "MCSERVE_HOST=0.0.0.0" in env.split()
    entrypoint, cmd = json.loads(last("ENTRYPOINT")), json.loads(last("CMD"))
    assert entrypoint + cmd == ["python", "-m", "service", "serve"]
    healthcheck = last("HEALTHCHECK")
    exec_form = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert exec_form[0] == "python" and "/healthz" in exec_form[-1]
    # from the build context only the model bundles and their evaluations; the rest from builders
    context = {
        args.split()[0]: args.split()[-1]
        for keyword, args in instructions
        if keyword in ("COPY", "ADD") and "--from=" not in args
    }
    assert set(context) == {"models/", "docs/evaluation/"}, context
    # the pages look for reports where the image put them (settings default: docs/evaluation)
    assert f"MCSERVE_MODEL_DIR={context['models/'].rstrip('/')}" in env.split()
    assert f"MCSERVE_EVALUATION_DIR={context['docs/evaluation/'].rstrip('/')}" in env.split()


def test_dockerignore_allows_only_what_the_dockerfile_copies(dockerfile: Dockerfile) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert patterns[0] == "*", "an allowlist: exclude everything, then re-include"
    # a re-included evaluation file counts as its folder, which the Dockerfile copies whole
    allowed = {
        "docs/evaluation" if p.startswith("!docs/evaluation") else p[1:].rstrip("/")
        for p in patterns
        if p.startswith("!")
    }
    assert not allowed & {".venv", ".git", "build", "tests", "bench", "docs", "deploy"}
    copied = {
        source.rstrip("/")
        for stage in dockerfile.stages.values()
        for keyword, args in stage.instructions
        if keyword in ("COPY", "ADD") and "--from=" not in args
        for source in args.split()[:-1]
        if not source.startswith("--")
    }
    assert copied == allowed


def in_context(relative: str, patterns: list[str]) -> bool:
    """.dockerignore's rule: the last pattern that matches the path or a folder above it wins
    (`!` re-includes); `*` stays within one path segment."""
    parts = relative.split("/")
    keep = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        segments = pattern.lstrip("!").rstrip("/").split("/")
        prefix = parts[: len(segments)]
        if len(prefix) == len(segments) and all(
            fnmatch.fnmatchcase(part, seg) for part, seg in zip(prefix, segments, strict=True)
        ):
            keep = negated
    return keep


def test_the_image_carries_what_the_model_pages_read_of_each_evaluation() -> None:
    """Exactly report.json and the plots the pages show (no Markdown, no bench results), for
    every bundled model's report: a new plot in PLOTS must be re-included too. (Checked with
    buildah 1.28: without the folder itself re-included, its COPY found nothing.)"""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    wanted = {"report.json"} | {f"{stem}.png" for stem in evaluations.PLOTS}
    reports = sorted((ROOT / "docs" / "evaluation").glob("*/report.json"))
    assert {r.parent.name for r in reports} >= {"breast-cancer", "diabetes", "digits"}
    assert in_context("docs/evaluation", patterns)
    for path in (ROOT / "docs" / "evaluation").rglob("*"):
        relative = path.relative_to(ROOT).as_posix()
        expected = path.parent.parent.name == "evaluation" and path.name in wanted
        if path.is_file():
            assert in_context(relative, patterns) == expected, relative
    for stem in evaluations.PLOTS:  # a plot no model has yet is carried too
        assert in_context(f"docs/evaluation/new-model/{stem}.png", patterns)
    assert not in_context("docs/README.md", patterns)


def runtime_distributions() -> set[str]:
    """What the image installs: pyproject's dependencies and theirs (markers and extras applied),
    as found in this environment."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    todo = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.distribution(req.name).requires or []
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} (a dependency of the package) is not installed here")
        for spec in map(Requirement, requires):
            extras = req.extras or {""}
            if spec.marker is None or any(spec.marker.evaluate({"extra": e}) for e in extras):
                todo.append(spec)
    return {name for name, _ in seen}


def import_time_modules(nodes: list[ast.stmt]) -> Iterator[str]:
    """Top-level names of what a module imports when it is imported: function bodies (optional
    features, such as matplotlib for calibration reports) and `if TYPE_CHECKING:` are left out."""
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from import_time_modules(node.orelse)
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    yield from import_time_modules([child])


def test_the_image_installs_every_module_the_service_imports() -> None:
    # the image has only pyproject's dependencies: a module the dev environment happens to have
    # would import in `make test` and fail in the container
    imported = {
        module
        for path in (ROOT / "service").rglob("*.py")
        for module in import_time_modules(ast.parse(path.read_text(), str(path)).body)
    }
    third_party = imported - set(sys.stdlib_module_names) - {"service", "__future__"}
    providers = importlib.metadata.packages_distributions()
    installed = runtime_distributions()
    missing = {
        module: providers.get(module, ["(not installed)"])
        for module in sorted(third_party)
        if not {canonicalize_name(d) for d in providers.get(module, [])} & installed
    }
    assert not missing, f"imported by service/ but not in pyproject's dependencies: {missing}"


def arg_default(stage: Stage, name: str) -> str:
    [value] = [
        a.split("=", 1)[1]
        for kw, a in stage.instructions
        if kw == "ARG" and a.startswith(f"{name}=")
    ]
    return value.strip('"')


LOCK = ROOT / "requirements.lock"
VALUED = {"--index-url", "-i", "--constraint", "-c", "--requirement", "-r", "--target", "-t",
          "--find-links", "-f", "--extra-index-url"}  # fmt: skip


def pip_installs(dockerfile: Dockerfile) -> Iterator[tuple[Stage, dict[str, list[str]], list[str]]]:
    """(stage, options with their values, packages) of every `pip install` in a RUN."""
    for stage in dockerfile.stages.values():
        for keyword, args in stage.instructions:
            if keyword != "RUN":
                continue
            for command in args.split("&&"):
                words = shlex.split(command)
                if words[:2] != ["pip", "install"]:
                    continue
                options: dict[str, list[str]] = {}
                packages: list[str] = []
                rest = iter(words[2:])
                for word in rest:
                    if word == "${PIP_EXTRA_ARGS}":  # options only (docs/DEPLOY.md)
                        continue
                    if word in VALUED:
                        options.setdefault(word, []).append(next(rest))
                    elif word.startswith("-"):
                        options.setdefault(word, [])
                    else:
                        packages.append(word)
                yield stage, options, packages


def test_every_installed_package_is_pinned_exactly(dockerfile: Dockerfile) -> None:
    """The image installs torch at TORCH_SPEC and everything else from requirements.lock, exact;
    nothing is resolved from a range (builds are reproducible)."""
    lock = {
        canonicalize_name(Requirement(line).name): line
        for line in LOCK.read_text().splitlines()
        if line and not line.startswith("#")
    }
    for line in lock.values():
        assert re.fullmatch(r"[a-z0-9-]+==[0-9][0-9A-Za-z.]*", line), line
    installs = list(pip_installs(dockerfile))
    assert len(installs) == 6  # the app (2), each venv: torch and the lock
    for stage, options, packages in installs:
        where = f"{stage.name}: pip install {options} {packages}"
        if "--requirement" in options:
            assert options["--requirement"] == ["/tmp/requirements.lock"], where
            assert "--no-deps" in options and packages == [], where
            continue
        [package] = packages
        if package == "${TORCH_SPEC}":
            spec = Requirement(arg_default(stage, "TORCH_SPEC"))
            assert str(spec.specifier).startswith("=="), where
            # without --no-deps (CUDA: torch brings its libraries) the rest is constrained
            assert "--no-deps" in options or options.get("--constraint"), where
        elif package == ".":  # the service itself: no dependencies, built by a locked backend
            assert {"--no-deps", "--no-build-isolation"} <= set(options), where
        else:  # a name pinned by the lock as a constraint
            assert options.get("--constraint") == ["requirements.lock"], where
            assert "--no-deps" in options and canonicalize_name(package) in lock, where


def test_the_lock_is_this_environment(dockerfile: Dockerfile) -> None:
    """requirements.lock is what deploy/lock.py writes here (every runtime dependency, the
    version the tests ran against); TORCH_SPEC pins this environment's torch."""
    spec = importlib.util.spec_from_file_location("deploy_lock", ROOT / "deploy" / "lock.py")
    assert spec is not None and spec.loader is not None
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    assert LOCK.read_text() == lock.lock_text(), (
        "rewrite it: python deploy/lock.py > requirements.lock"
    )
    locked = {
        canonicalize_name(line.split("==")[0])
        for line in lock.lock_text().splitlines()
        if "==" in line
    }
    assert locked | {"torch"} == {canonicalize_name(d) for d in runtime_distributions()}
    torch = "torch==" + lock.public(importlib.metadata.version("torch"))
    for name in ("venv-cpu", "venv-cuda"):
        assert arg_default(dockerfile.stages[name], "TORCH_SPEC") == torch, name
    assert f"TORCH_SPEC ?= {torch}" in (ROOT / "deploy" / "image.mk").read_text()
