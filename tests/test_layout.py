"""The layout shows the processes (docs/architecture.md, "Which process runs which folder"):
imports point down only (gateway → engine → store), and the engine process loads no module of
the API process's folder."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# a package and the top-level modules its files may not import
FORBIDDEN = {"store": {"engine", "gateway", "aiohttp"}, "engine": {"gateway", "aiohttp"}}


def _imported(path: pathlib.Path) -> set[str]:
    """The top-level names of every module `path` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imports_point_down_only():
    upward = [f"{path.relative_to(ROOT)} imports {', '.join(sorted(bad))}"
              for package, forbidden in FORBIDDEN.items()
              for path in sorted((ROOT / package).rglob("*.py"))
              if (bad := _imported(path) & forbidden)]
    assert upward == []


def test_the_engine_side_loads_no_api_process_module():
    """What the engine process imports (its entry point, the configuration it is sent, the shell),
    and a Ray replica's module where Ray is installed, pull in nothing from gateway/."""
    code = ("import importlib.util, pickle, sys\n"
            "import engine.serving.process, engine.serving.shell\n"
            "from engine.serving.config import ServingConfig\n"
            "pickle.loads(pickle.dumps(ServingConfig()))\n"
            "if importlib.util.find_spec('ray'): import engine.serving.replica\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'gateway'))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_api_process_sends_the_engine_only_its_serving_config():
    """The engine process is spawned with a ServingConfig: the API side's sections (server,
    tenants' keys, replicas) stay in the API process."""
    from gateway.config import build_config
    config = build_config({"server": {"port": 9000}, "engine": {"block_size": 32},
                           "tenants": [{"name": "a", "api_key": "sk-a", "weight": 2.0}]})
    serving = config.serving()
    assert serving.engine.block_size == 32 and serving.store == config.store
    assert dict(serving.tenants)["a"].weight == 2.0
    assert serving.persist_s == config.server.shutdown_timeout_s * 0.7
    assert not any("sk-a" in repr(v) for v in vars(serving).values())
