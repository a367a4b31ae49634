"""Find a usable Java runtime before any heavy work starts.

pycocoevalcap's PTB tokenizer (Stanford CoreNLP 3.4.1) and METEOR 1.5 are Java programs. Without
this check a missing `java` only shows up after training or decoding, as a bare
`FileNotFoundError: 'java'` from deep inside subprocess; entry points call `check_java()` first.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess

JAVA_HINT = "pycocoevalcap's PTB tokenizer and METEOR need Java 8+; install e.g. openjdk-17-jre-headless"


class JavaMissingError(RuntimeError):
    """No usable Java runtime: a user error (install one), reported in one line by the entry points."""


def check_java() -> str:
    """Return the path of the `java` executable on PATH, or raise JavaMissingError saying what is wrong.

    Checks that `java` exists, that `java -version` runs, and (when the version string can be
    parsed) that it is Java 8 or newer. The version probe is cached per executable path.
    """
    java = shutil.which("java")
    if java is None:
        raise JavaMissingError(f"Java runtime not found on PATH: {JAVA_HINT}")
    _probe_java(java)
    return java


@functools.lru_cache(maxsize=8)
def _probe_java(java: str) -> int | None:
    """Run `java -version` once per path; return the major version (None if unparseable)."""
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise JavaMissingError(
            f"Java runtime at {java} is not usable (`java -version` failed: {e}): {JAVA_HINT}"
        ) from e
    text = (proc.stderr + proc.stdout).decode("utf-8", errors="replace")
    if proc.returncode != 0:
        first = text.strip().splitlines()[0] if text.strip() else "no output"
        raise JavaMissingError(
            f"Java runtime at {java} is not usable (`java -version` exited with "
            f"{proc.returncode}: {first}): {JAVA_HINT}"
        )
    major = _major_version(text)
    if major is not None and major < 8:
        raise JavaMissingError(f"Java runtime at {java} is Java {major}: {JAVA_HINT}")
    return major


def _major_version(version_output: str) -> int | None:
    """'openjdk version "17.0.15"' -> 17, 'java version "1.8.0_292"' -> 8, unknown -> None."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if match is None:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2) is not None:  # pre-Java-9 scheme: 1.8 means Java 8
        major = int(match.group(2))
    return major
