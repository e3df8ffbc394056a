"""The lock file is what runs: it covers pyproject.toml, and this environment is exactly it."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def pins(name: str) -> dict[str, str]:
    text = (ROOT / "requirements" / name).read_text(encoding="utf-8")
    found: dict[str, str] = {canonicalize_name(n): v for n, v in _PIN.findall(text)}
    assert found, f"no pins in requirements/{name}"
    return found


def declared(extra: str | None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = list(project["dependencies"])
    if extra:
        names += project["optional-dependencies"][extra]
    return [Requirement(n) for n in names]


def test_every_pin_has_hashes() -> None:
    for name in ("base.txt", "test.txt"):
        text = (ROOT / "requirements" / name).read_text(encoding="utf-8")
        for block in re.split(r"\n(?=[A-Za-z0-9])", text):
            if "==" in block:
                assert "--hash=sha256:" in block, f"{name}: {block.splitlines()[0]} has no hash"


def test_the_lock_satisfies_pyproject() -> None:
    """A pyproject.toml edited without `make lock` fails here, naming the requirement."""
    for name, extra in (("base.txt", None), ("test.txt", "test")):
        locked = pins(name)
        for requirement in declared(extra):
            key = canonicalize_name(requirement.name)
            assert key in locked, f"{requirement} is not in requirements/{name}: run make lock"
            pin = locked[key]
            assert requirement.specifier.contains(pin, prereleases=True), (
                f"requirements/{name} pins {key}=={pin}, outside {requirement}: run make lock"
            )


def test_base_agrees_with_test() -> None:
    base, test = pins("base.txt"), pins("test.txt")
    assert {k: test.get(k) for k in base} == base


def test_this_environment_is_the_lock() -> None:
    """What the suite runs on is what a fresh install gets (`make test` installs the lock)."""
    for key, version in pins("test.txt").items():
        assert metadata.version(key) == version, f"{key} {metadata.version(key)} != lock {version}"
