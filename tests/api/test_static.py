"""The vendored browser libraries are the files their README names, byte for byte."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

VENDOR = Path(__file__).resolve().parents[2] / "api" / "static" / "vendor"


def test_each_vendored_file_has_the_sha256_its_readme_records() -> None:
    rows = re.findall(
        r"^\| `([^`]+)` \| ([^|]+) \|.*\| `([0-9a-f]{64})` \|$",
        (VENDOR / "README.md").read_text(),
        re.M,
    )
    assert {name for name, _, _ in rows} == {"marked.esm.js", "purify.es.mjs"}
    for name, package, digest in rows:
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, (
            f"{name} is not the file of {package.strip()}: re-copy it from the npm tarball "
            "or update api/static/vendor/README.md with the upgrade"
        )
    # Each library ships with its licence.
    assert "distributed under the MIT license" in (VENDOR / "marked.LICENSE.md").read_text()
    assert "Apache License" in (VENDOR / "dompurify.LICENSE").read_text()
