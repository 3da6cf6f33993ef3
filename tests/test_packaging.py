"""Packaging and configuration hygiene: setup.cfg and environment.yml agree, every config key is documented."""
from __future__ import annotations

import configparser
import re
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PIP = {"pytorch": "torch"}  # conda-forge names that differ from PyPI's
NOT_DEPENDENCIES = {"torch-scatter", "flash-attn", "torch_scatter", "flash_attn"}


def _requirements(lines: str) -> dict[str, str]:
    reqs = [Requirement(line) for line in lines.strip().splitlines() if line.strip() and not line.startswith("#")]
    return {r.name.lower(): str(r.specifier) for r in reqs}


def setup_cfg_packages(*extras: str) -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    packages = _requirements(cfg["options"]["install_requires"])
    for extra in extras:
        packages.update(_requirements(cfg["options.extras_require"][extra]))
    return packages


def environment_packages() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    packages = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for line in dep["pip"]:
                if not line.startswith("-e"):
                    packages.update(_requirements(line))
        elif not re.match(r"^(python|pip)\b", dep):
            req = Requirement(dep)
            packages[CONDA_TO_PIP.get(req.name.lower(), req.name.lower())] = str(req.specifier)
    return packages


def test_environment_yml_names_the_same_packages_as_setup_cfg():
    assert environment_packages() == setup_cfg_packages("cu118", "dev")


def test_one_spconv_extra_per_cuda_flavour_and_no_forbidden_dependencies():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = cfg["options.extras_require"]
    for flavour in ("cu118", "cu121", "cu124", "cu126"):
        assert list(_requirements(extras[flavour])) == [f"spconv-{flavour}"]
    assert not any(name.startswith("spconv") for name in setup_cfg_packages())  # never two builds at once
    everything = set(setup_cfg_packages(*extras)) | set(environment_packages())
    assert not everything & NOT_DEPENDENCIES


def test_top_level_layout():
    for name in ("scalept", "conf", "slurm", "preprocessing", "tests", "data"):
        assert (ROOT / name).is_dir(), name
    for name in ("environment.yml", "setup.cfg", "README.md", "pyproject.toml", ".ci/run"):
        assert (ROOT / name).is_file(), name


def test_every_config_key_is_commented():
    """A key is documented by a comment on its line or on the line(s) right above it (the text of a
    block scalar, ``key: |``, is a value, not keys)."""
    undocumented = []
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        lines = path.read_text().splitlines()
        block_indent = None  # indentation of the key whose block scalar is being read
        for i, line in enumerate(lines):
            indent = len(line) - len(line.lstrip())
            if block_indent is not None and (not line.strip() or indent > block_indent):
                continue
            block_indent = indent if re.search(r":\s*[|>][-+]?\s*(#.*)?$", line) else None
            if not re.match(r"^\s*[A-Za-z_][\w.]*:", line) or line.strip().startswith("#"):
                continue
            above = lines[i - 1].strip() if i else ""
            if "#" not in line and not above.startswith("#"):
                undocumented.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}")
    assert not undocumented, "\n".join(undocumented)


def test_readme_quickstart_has_the_command_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if re.match(r"^python -m pip install .*pytest", line)]
    assert len(commands) == 1  # .ci/run takes this line and runs it verbatim
    assert "grep -m1 -E '^python -m pip install .*pytest' README.md" in (ROOT / ".ci" / "run").read_text()
