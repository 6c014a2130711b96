"""The method reference (docs/methods.md) against the registry, and no pointers to files outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from sar_dist.merge.base import REQUIRED
from sar_dist.merge.registry import METHODS
from tests.conftest import REPO

DOC = REPO / "docs" / "methods.md"
# what users get: the package, the README, the pipelines, benchmarks, configs and cluster files
CHECKED = ["sar_dist", "README.md", "pipelines", "bench", "configs", "cluster", "docs", "Makefile", "pyproject.toml"]
OUTSIDE = re.compile(r"\.\./shared|/work/shared|\bDESIGN\.md|\bMETHODS\.md|\bSTYLE\.md")


def _sections(text: str) -> dict[str, str]:
    """``### `name` `` heading -> its text up to the next heading of level 1 to 3."""
    out = {}
    parts = re.split(r"^(#{1,3} .*)$", text, flags=re.MULTILINE)
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        m = re.fullmatch(r"### `([a-z_]+)`", heading.strip())
        if m:
            out[m.group(1)] = body
    return out


def _params(section: str) -> dict[str, tuple[str, str]]:
    """``| `key` | scope | default |`` rows -> {key: (scope, first word of the default)}."""
    rows = re.findall(r"^\| `([a-z_0-9]+)` \| ([^|]+) \| ([^|]+) \|$", section, flags=re.MULTILINE)
    return {key: (scope.strip(), default.strip().split(" ")[0].strip("`")) for key, scope, default in rows}


def _expected_default(default: object) -> str:
    if default is REQUIRED:
        return "required"
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def test_every_method_has_a_section_with_its_parameters_and_defaults():
    sections = _sections(DOC.read_text())
    assert set(METHODS) <= set(sections), sorted(set(METHODS) - set(sections))
    for name, method in METHODS.items():
        documented = _params(sections[name])
        fields = {f.metadata["yaml"]: f.metadata for f in method.param_fields()}
        assert set(documented) == set(fields), (name, sorted(documented), sorted(fields))
        for key, meta in fields.items():
            scope, default = documented[key]
            assert scope == ("per model" if meta["per_model"] else "method-wide"), (name, key, scope)
            want = _expected_default(meta["default"])
            if isinstance(meta["default"], float):
                assert float(default) == meta["default"], (name, key, default)
            else:
                assert default == want, (name, key, default)


def test_overview_table_matches_the_registry():
    text = DOC.read_text()
    overview = text.split("## The methods", 1)[1].split("###", 1)[0]
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| [^|]+ \| ([^|]+) \|", overview, flags=re.MULTILINE))
    assert set(rows) == set(METHODS)
    for name, method in METHODS.items():
        assert (rows[name].strip() == "required") is method.needs_base, name
    assert "## Where sar-dist differs from mergekit on purpose" in text
    assert "## Parameter resolution" in text


def test_readme_links_the_method_reference():
    assert "(docs/methods.md)" in (REPO / "README.md").read_text()


def _repo_files(top: str) -> list[Path]:
    """The files under ``top`` that belong to the repository (tracked or not ignored), without git: all."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", top], cwd=REPO,
                             capture_output=True, text=True, check=True, timeout=60).stdout
        return [REPO / line for line in out.splitlines() if (REPO / line).is_file()]
    except (OSError, subprocess.SubprocessError):
        root = REPO / top
        return [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]


@pytest.mark.parametrize("top", CHECKED)
def test_no_reference_to_files_outside_the_repository(top):
    files = _repo_files(top)
    bad = []
    for path in files:
        if path.stat().st_size > 2**21:
            continue  # data (benchmark outputs, checkpoints), not prose
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary files
        bad += [f"{path.relative_to(REPO)}:{i + 1}" for i, line in enumerate(text.splitlines()) if OUTSIDE.search(line)]
    assert not bad, bad


def test_every_ranged_parameter_has_its_valid_values_documented():
    text = DOC.read_text()
    table = text.split("### Valid values", 1)[1].split("\n### ", 1)[0]
    documented = {key for cell in re.findall(r"^\|[^|]+\| ([^|]*) \|", table, flags=re.MULTILINE)
                  for key in re.findall(r"`([a-z_]+)`", cell)}
    ranged = {f.metadata["yaml"] for m in METHODS.values() for f in m.param_fields() if f.metadata.get("valid")}
    assert ranged <= documented, sorted(ranged - documented)
