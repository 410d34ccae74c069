"""Layering rules, read with `ast` (no project code is imported). Layers, bottom to top: sharding/ <
lvr_jax/models < weights < data, rollout, rl < eval, train, lvr_jax/*.py < launch/; configs/ imports only
sharding. Each checker maps a repository root to violation messages; planted tests use tiny fake trees."""
import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sharding", "lvr_jax", "configs", "launch")
LVR_RANKS = {"models": 1, "weights": 2, "data": 3, "rollout": 3, "rl": 3, "eval": 4, "train": 4}
LAYER_NAMES = ["sharding", "models", "weights", "data/rollout/rl", "eval/train/lvr_jax top", "launch"]
STACK_NAMES = {"decoder_layer", "encoder_layer", "scan_layers", "LAYER_PARAMS", "Qwen2Layers", "SiglipLayers"}
PATH_MUTATORS = {"insert", "append", "extend", "remove", "pop", "clear", "reverse", "sort", "__setitem__"}
MAX_LINES, MAX_LAUNCH_LINES = 500, 150


def source_files(root: Path, tops=PACKAGES) -> list[Path]:
    """Every *.py under root/<top> for each top (hidden and __pycache__ folders skipped), sorted."""
    return sorted(p for top in tops if (root / top).is_dir() for p in (root / top).rglob("*.py")
                  if not any(s.startswith(".") or s == "__pycache__" for s in p.relative_to(root).parts))


_rel = lambda root, path: path.relative_to(root).as_posix()
_text = lambda path: path.read_text(encoding="utf-8", errors="replace")
_const = lambda node: node.value if isinstance(node, ast.Constant) else None


@functools.lru_cache(maxsize=None)
def _walk(text: str) -> tuple | None:  # every AST node of `text`, None when it does not parse
    try:
        return tuple(ast.walk(ast.parse(text)))
    except (SyntaxError, ValueError):
        return None


nodes = lambda path: _walk(_text(path)) or ()  # every AST node of the file, () when it does not parse
_unparseable = lambda root, paths: [f"{_rel(root, p)}: cannot parse" for p in paths if not nodes(p)]
_dotted = lambda node: (  # 'a.b.c' for a Name/Attribute chain, '' otherwise
    f"{_dotted(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) else getattr(node, "id", ""))
module_name = lambda root, path: ".".join(path.relative_to(root).parts)[:-3].removesuffix(".__init__")


def project_modules(root: Path) -> dict[str, Path]:
    """{dotted name: path} of every module in the project packages (launch scripts are launch.<name>)."""
    return {module_name(root, p): p for p in source_files(root)}


def imports_of(path: Path, root: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """[(line, project module)] for every import in `path` of a project module, lazy ones included.
    Relative imports are resolved; `from pkg import sub` imports pkg.sub when that is a module; in launch/
    a bare script name (`import common`) is launch.common; importlib.import_module("a.b") counts too."""
    me = module_name(root, path)
    package = (me if path.name == "__init__.py" else me.rpartition(".")[0]).split(".")
    scripts = ({m[7:] for m in modules if m[:7] == "launch." and "." not in m[7:]}  # launch/ is on sys.path
               if me[:7] == "launch." else ())
    absolute = lambda name: f"launch.{name}" if name.split(".")[0] in scripts else name
    names = []
    for node in nodes(path):
        if isinstance(node, ast.Import):
            names += [(node.lineno, absolute(a.name)) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".")
                    if node.level else absolute(node.module))
            names += [(node.lineno, f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
                      for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(_const(node.args[0]), str)
              and _dotted(node.func) in ("importlib.import_module", "import_module", "__import__")):
            names.append((node.lineno, absolute(node.args[0].value)))
    prefixes = lambda name: [name.rsplit(".", i)[0] for i in range(name.count(".") + 1)]  # longest 1st
    return [(line, hit[0]) for line, name in names if (hit := [t for t in prefixes(name) if t in modules])]


def import_cycles(root: Path) -> list[str]:
    """Import cycles (lazy imports included): the shortest through each module not in one reported yet."""
    modules = project_modules(root)
    graph = {m: {} for m in modules}  # module -> {imported module: 'file:line'}
    for mod, path in modules.items():
        for line, target in imports_of(path, root, modules):
            if target != mod:
                graph[mod].setdefault(target, f"{_rel(root, path)}:{line}")
    out, reported = _unparseable(root, modules.values()), set()
    for start in sorted(graph):
        prev, queue = {}, [start]
        for v in queue:  # breadth first: prev[start] ends the shortest way back to start
            for w in sorted(set(graph[v]) - set(prev)):
                prev[w] = v
                queue.append(w)
        if start in prev and start not in reported:
            cycle = [start]
            while len(cycle) == 1 or cycle[-1] != start:
                cycle.append(prev[cycle[-1]])
            cycle.reverse()
            reported.update(cycle)
            via = "; ".join(f"{graph[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:]))
            out.append(f"import cycle {cycle} ({via})")
    return out


def sharding_imports_lvr_jax(root: Path) -> list[str]:
    """Imports of lvr_jax, configs or launch from sharding/."""
    modules, files = project_modules(root), source_files(root, ("sharding",))
    return _unparseable(root, files) + [
        f"{_rel(root, p)}:{line}: sharding imports {target}" for p in files
        for line, target in imports_of(p, root, modules) if target.split(".")[0] != "sharding"]


def layer_of(root: Path, path: Path) -> int | None:
    """Rank of the layer of `path`; None for configs/ and for lvr_jax subpackages in no layer."""
    parts = path.relative_to(root).parts
    if parts[0] == "lvr_jax":
        return 4 if len(parts) == 2 else LVR_RANKS.get(parts[1])
    return {"sharding": 0, "launch": 5}.get(parts[0])


def layer_violations(root: Path) -> list[str]:
    """Imports of a higher layer from a lower one, configs importing beyond sharding, unlayered code."""
    modules = project_modules(root)
    out = _unparseable(root, modules.values())
    for path in modules.values():
        where, rank = _rel(root, path), layer_of(root, path)
        if rank is None and where.startswith("lvr_jax/"):
            out.append(f"{where}: lvr_jax/{path.relative_to(root).parts[1]}/ is in no layer")
            continue
        for line, target in imports_of(path, root, modules):
            up = layer_of(root, modules[target])
            if where.startswith("configs/") and target.split(".")[0] not in ("sharding", "configs"):
                out.append(f"{where}:{line}: configs imports {target} (only sharding allowed)")
            elif rank is not None and up is not None and up > rank:
                out.append(f"{where}:{line}: {LAYER_NAMES[rank]} imports {target} ({LAYER_NAMES[up]})")
    return out


def stack_outside_models(root: Path) -> list[str]:
    """References to the layer-stack names, or `.layers` on an object, outside lvr_jax/models/."""
    modules = project_modules(root)
    files = [p for p in source_files(root) if not _rel(root, p).startswith("lvr_jax/models/")]
    out = _unparseable(root, files)
    for path in files:
        found = set()
        for node in nodes(path):
            name = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                    else node.name.rpartition(".")[2] if isinstance(node, ast.alias) else None)
            if isinstance(node, ast.Call) and _dotted(node.func) == "getattr" and len(node.args) > 1:
                name = _const(node.args[1])
            on_object = not isinstance(node, (ast.Name, ast.alias)) and _dotted(node) not in modules
            if name in STACK_NAMES or (name == "layers" and on_object):
                found.add((node.lineno, ".layers" if name == "layers" else name))
        out += [f"{_rel(root, path)}:{line}: {name} outside lvr_jax/models" for line, name in sorted(found)]
    return out


def _edits_sys_path(node) -> bool:
    """True for a node that changes sys.path, calls site.addsitedir or sets PYTHONPATH."""
    if isinstance(node, ast.Call):
        func = _dotted(node.func)
        pythonpath = [_const(a) for a in node.args] + [k.arg for k in node.keywords]
        return (func.startswith("sys.path.") and func.rpartition(".")[2] in PATH_MUTATORS
                or func.endswith("addsitedir") or "PYTHONPATH" in pythonpath
                and func in ("os.environ.update", "os.environ.setdefault", "os.putenv"))
    targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else (
        [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
    return any(_dotted(t) == "sys.path" or isinstance(t, ast.Subscript) and _const(t.slice) == "PYTHONPATH"
               and _dotted(t.value) == "os.environ" for target in targets for t in ast.walk(target))


def launch_script_problems(root: Path) -> list[str]:
    """Launch scripts that are too long, define a class, or edit sys.path / PYTHONPATH."""
    files = [p for p in source_files(root, ("launch",)) if p.parent == root / "launch"]
    out = _unparseable(root, files)
    for path in files:
        where, lines = _rel(root, path), len(_text(path).splitlines())
        if lines > MAX_LAUNCH_LINES:
            out.append(f"{where}: {lines} lines (launch scripts: max {MAX_LAUNCH_LINES})")
        out += [f"{where}:{line}: {what}" for line, what in sorted(
            (n.lineno, f"defines class {n.name}" if isinstance(n, ast.ClassDef) else "edits sys.path")
            for n in nodes(path) if isinstance(n, ast.ClassDef) or _edits_sys_path(n))]
    return out


def long_files(root: Path) -> list[str]:
    """Source files (project packages and tests/) over MAX_LINES lines."""
    return [f"{_rel(root, p)}: {n} lines (max {MAX_LINES})" for p in source_files(root, PACKAGES + ("tests",))
            if (n := len(_text(p).splitlines())) > MAX_LINES]


def _real_tree_test(check):
    def test():
        assert not (problems := check(ROOT)), "\n".join(problems)
    return test


test_import_cycles = _real_tree_test(import_cycles)
test_sharding_imports_lvr_jax = _real_tree_test(sharding_imports_lvr_jax)
test_layer_violations = _real_tree_test(layer_violations)
test_stack_outside_models = _real_tree_test(stack_outside_models)
test_launch_script_problems = _real_tree_test(launch_script_problems)
test_long_files = _real_tree_test(long_files)

CLEAN_TREE = {  # each layer importing the one below, relative and lazy imports, files at the length limits
    "sharding/__init__.py": "", "sharding/mesh.py": "mesh = None\n", "lvr_jax/__init__.py": "",
    "lvr_jax/cli.py": "from lvr_jax.train import x\n", "lvr_jax/models/__init__.py": "",
    "lvr_jax/models/qwen2.py": "from sharding.mesh import mesh\n\n\ndef decoder_layer(h):\n    return mesh\n",
    "lvr_jax/weights/__init__.py": "", "lvr_jax/weights/hf.py": "from lvr_jax.models import qwen2\n",
    "lvr_jax/rollout/__init__.py": "", "lvr_jax/rollout/x.py": "from lvr_jax.models.qwen2 import mesh\n",
    "lvr_jax/rl/__init__.py": "", "lvr_jax/rl/a.py": "from lvr_jax.rollout import x\n",
    "lvr_jax/rl/b.py": "from . import a\n", "lvr_jax/train/__init__.py": "",
    "lvr_jax/train/x.py": "from lvr_jax.rl import b\nfrom ..weights import hf\n",
    "lvr_jax/train/ok.py": "y = 1\n" * MAX_LINES, "configs/__init__.py": "",
    "configs/common.py": "from sharding import mesh\n", "configs/tiny.py": "from configs import common\n",
    "launch/common.py": "import sys\n\nROOT = sys.argv[0]\n", "launch/ok.py": "y = 1\n" * MAX_LAUNCH_LINES,
    "launch/x.py": "import common\nfrom lvr_jax.train import x\n\n\ndef main():\n    from plot import draw\n",
    "launch/plot.py": "def draw(*args):\n    return args\n",
    "tests/test_x.py": "from lvr_jax.models.qwen2 import decoder_layer\n\nassert decoder_layer.layers\n",
}
LAZY = "\n\ndef lazy():\n    {}\n"
CYCLE = "['lvr_jax.rl.a', 'lvr_jax.rl.b', 'lvr_jax.rl.a']"


def _append(root: Path, files: dict[str, str]):
    for name, text in files.items():
        (path := root / name).parent.mkdir(parents=True, exist_ok=True)
        path.write_text((path.read_text() if path.exists() else "") + text)


def _plant(root: Path, check, name: str, text: str) -> str:
    """Write the clean tree and check it passes, append `text` to `name`, expect one violation naming it."""
    _append(root, CLEAN_TREE)
    assert check(root) == []
    _append(root, {name: text})
    problems = check(root)
    assert len(problems) == 1 and name in problems[0], problems
    return problems[0]


@pytest.mark.parametrize("name, text, cycle", [
    ("lvr_jax/rl/a.py", LAZY.format("from lvr_jax.rl import b"), CYCLE),
    ("launch/plot.py", LAZY.format("import x"), "['launch.plot', 'launch.x', 'launch.plot']")])
def test_import_cycles_catches_a_planted_violation(tmp_path, name, text, cycle):
    assert cycle in _plant(tmp_path, import_cycles, name, text)


@pytest.mark.parametrize("text", [LAZY.format("import lvr_jax.models.qwen2"), "from configs import common\n"])
def test_sharding_imports_lvr_jax_catches_a_planted_violation(tmp_path, text):
    _plant(tmp_path, sharding_imports_lvr_jax, "sharding/mesh.py", text)


@pytest.mark.parametrize("name, text", [
    ("lvr_jax/models/qwen2.py", LAZY.format("from lvr_jax.train import x")),
    ("lvr_jax/weights/hf.py", "from ..rollout import x\n"), ("lvr_jax/utils/u.py", "import sharding\n"),
    ("lvr_jax/train/x.py", "from launch import plot\n"), ("configs/tiny.py", "from lvr_jax import models\n")])
def test_layer_violations_catches_a_planted_violation(tmp_path, name, text):
    _plant(tmp_path, layer_violations, name, text)


@pytest.mark.parametrize("name, text", [
    ("lvr_jax/rollout/x.py", "\n\ndef run(llm):\n    return llm.layers\n"),
    ("lvr_jax/rl/a.py", "from lvr_jax.models.qwen2 import decoder_layer\n"),
    ("sharding/mesh.py", LAZY.format("return mesh.scan_layers")), ("launch/x.py", "getattr(x, 'layers')\n")])
def test_stack_outside_models_catches_a_planted_violation(tmp_path, name, text):
    _plant(tmp_path, stack_outside_models, name, text)


@pytest.mark.parametrize("name, text", [
    ("launch/x.py", "sys.path.insert(0, '.')\n"), ("launch/x.py", "sys.path[:0] = ['.']\n"),
    ("launch/x.py", "site.addsitedir('.')\n"), ("launch/x.py", "os.environ['PYTHONPATH'] = '.'\n"),
    ("launch/x.py", LAZY.format("class Config:\n        pass")),
    ("launch/long.py", "y = 1\n" * (MAX_LAUNCH_LINES + 1))])
def test_launch_script_problems_catches_a_planted_violation(tmp_path, name, text):
    _plant(tmp_path, launch_script_problems, name, text)


@pytest.mark.parametrize("name, text", [("tests/test_big.py", "y = 1\n" * (MAX_LINES + 1)),
                                        ("lvr_jax/train/ok.py", "y = 1\n")])
def test_long_files_catches_a_planted_violation(tmp_path, name, text):
    _plant(tmp_path, long_files, name, text)


def test_unparseable_files_are_reported(tmp_path):
    _append(tmp_path, {**CLEAN_TREE, "sharding/mesh.py": "def (:\n", "launch/x.py": "def (:\n"})
    for check in (import_cycles, sharding_imports_lvr_jax, layer_violations, stack_outside_models,
                  launch_script_problems):
        assert any("cannot parse" in p for p in check(tmp_path)), check.__name__
