"""The documentation stays true to the tree: the README's "Where things live" table names
folders and files that exist, and every folder of the package; docs/architecture.md names every
module of the package and each contract's file; every relative link in README.md and docs/
resolves."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("actors", "buffer", "learner")


def _package_modules() -> set[str]:
    """Every module of the package as a repository path (the role folders where they are)."""
    layers = [p for p in (ROOT / "offpolicy").iterdir() if p.is_dir() and not p.is_symlink()
              and p.name != "__pycache__"]
    files = [f for d in (*layers, *(ROOT / r for r in ROLES)) for f in d.glob("*.py")]
    return {str(f.relative_to(ROOT)) for f in files
            if f.name != "__init__.py" or f.parent.name == "envs"}


def _where_things_live() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## Where things live", 1)[1].split("\n## ", 1)[0]


def test_where_things_live_matches_the_tree():
    named = set(re.findall(r"`([^`]+)`", _where_things_live()))
    paths = {p for p in named if "/" in p or p.endswith((".py", ".txt", ".md"))}
    missing = sorted(p for p in paths if not (ROOT / p.rstrip("/")).exists())
    assert not missing, f"README names paths that do not exist: {missing}"
    folders = {str(Path(m).parent) + "/" for m in _package_modules()}
    unnamed = sorted(f for f in folders if f not in paths)
    assert not unnamed, f"package folders missing from README's 'Where things live': {unnamed}"


def test_architecture_names_every_module_and_each_contracts_file():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`([\w/]+\.py)`", text))
    unnamed = sorted(m for m in _package_modules() if m not in named)
    assert not unnamed, f"modules missing from docs/architecture.md: {unnamed}"
    for contract, path in [("Engine", "actors/engine.py"),
                           ("WeightSync", "offpolicy/weights/sync.py"),
                           ("Admission", "buffer/replay.py"), ("Store", "buffer/store.py"),
                           ("Sampler", "buffer/samplers.py"),
                           ("LossSpec", "offpolicy/algorithms/losses.py"),
                           ("register_env", "offpolicy/envs/__init__.py"),
                           ("Ledger", "buffer/ledger.py"), ("Parallel", "learner/parallel.py"),
                           ("ParityCheck", "learner/parity.py"),
                           ("Layout", "offpolicy/runtime/layout.py"),
                           ("Desk", "offpolicy/runtime/desk.py"),
                           ("RunPlan", "offpolicy/config/plan.py")]:
        assert contract in text and path in text, contract
        assert (ROOT / path).exists(), path


def test_relative_links_resolve():
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_the_config_reference_in_the_docs_is_current(capsys):
    from offpolicy.tools.cli import main

    assert main(["config-reference"]) == 0
    table = capsys.readouterr().out
    assert table.strip() in (ROOT / "docs" / "configuration.md").read_text(), (
        "docs/configuration.md: regenerate its table with `offpolicy config-reference`")
