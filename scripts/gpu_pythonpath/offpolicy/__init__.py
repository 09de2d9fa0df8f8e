"""offpolicy from the source tree, for a machine where pip cannot install it (no network, no
build backend): scripts/gpu_check.sh puts this folder on PYTHONPATH. It maps the packages as
pyproject.toml's `package-dir` does (`offpolicy.learner` is `learner/`, and so on) and then runs
the real `offpolicy/__init__.py`."""

import importlib.util
import sys
from pathlib import Path

_root = Path(__file__).resolve().parents[3]
__path__ = [str(_root / "offpolicy")]
for _sub in ("actors", "learner", "buffer"):
    _spec = importlib.util.spec_from_file_location(
        f"offpolicy.{_sub}", _root / _sub / "__init__.py",
        submodule_search_locations=[str(_root / _sub)])
    sys.modules[_spec.name] = globals()[_sub] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_spec.name])
exec(compile((_root / "offpolicy" / "__init__.py").read_text(),
             str(_root / "offpolicy" / "__init__.py"), "exec"))
