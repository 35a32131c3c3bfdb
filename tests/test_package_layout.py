"""The package's architecture, read from its import statements (module level and lazy ones):
pure core → engine → compact model → report / deploy, with no import cycle, and nothing in it
that only the benchmarks or the tests use."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

from helpers import REPO_ROOT

PACKAGE = REPO_ROOT / 'lrpet_mm'

#: Which subpackages each subpackage may import (the layering docs/development.md describes).
ALLOWED = {
    'lowrank': set(),
    'utils': set(),
    'workarounds': set(),
    'datasets': set(),
    'engine': {'lowrank', 'utils', 'workarounds'},
    'models': {'lowrank', 'engine', 'utils'},
    'report': {'lowrank', 'engine', 'models', 'utils'},
    'deploy': {'lowrank', 'engine', 'models', 'utils'},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


def from_target(node: ast.ImportFrom, path: Path) -> str:
    """The absolute name of the module a ``from ... import`` statement in ``path`` reads."""
    if not node.level:
        return node.module or ''
    package = module_name(path) if path.name == '__init__.py' else module_name(path.parent)
    base = package.split('.')
    base = base[:len(base) - node.level + 1]
    return '.'.join(base + ([node.module] if node.module else []))


def imported_modules(path: Path) -> Set[str]:
    """Absolute names of the ``lrpet_mm`` modules/packages a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = from_target(node, path)
            found.add(target)
            # `from pkg import submodule` imports the submodule too
            found.update(f'{target}.{alias.name}' for alias in node.names)
    known = {module_name(p) for p in PACKAGE.rglob('*.py')}
    return {name for name in found if name in known and name != module_name(path)}


def subpackage(module: str) -> Optional[str]:
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else None


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_detects_a_cycle_and_accepts_a_dag():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) is None


def test_subpackages_import_only_the_layers_below_them():
    files = [p for p in PACKAGE.rglob('*.py') if p.parent != PACKAGE]
    assert {subpackage(module_name(p)) for p in files} == set(ALLOWED), (
        'a new subpackage needs its place in the layering (ALLOWED)')
    wrong = []
    graph: Dict[str, Set[str]] = {}
    for path in files:
        source = subpackage(module_name(path))
        for target in imported_modules(path):
            dest = subpackage(target)
            if dest is None or dest == source:
                continue
            graph.setdefault(source, set()).add(dest)
            if dest not in ALLOWED[source]:
                wrong.append(f'{module_name(path)} imports {target}')
    assert not wrong, wrong
    assert find_cycle(graph) is None


def test_no_module_import_cycle_inside_a_subpackage():
    graph: Dict[str, Set[str]] = {}
    for path in PACKAGE.rglob('*.py'):
        if path.name == '__init__.py':
            continue  # packages re-export their modules: not a dependency of their own
        name = module_name(path)
        graph[name] = {t for t in imported_modules(path)
                       if subpackage(t) == subpackage(name) and not t.endswith('__init__')
                       and (PACKAGE.parent / (t.replace('.', '/') + '.py')).is_file()}
    assert find_cycle(graph) is None, find_cycle(graph)


def all_imports(path: Path) -> Set[str]:
    """Top-level names of every module a file imports (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split('.')[0])
    return names


def test_benchmark_code_is_not_in_the_installed_package():
    offenders = [str(p.relative_to(REPO_ROOT)) for p in PACKAGE.rglob('*.py')
                 if all_imports(p) & {'benchlib', 'benchmarks'}
                 or 'parents[2]' in p.read_text()]
    assert not offenders, offenders
    assert not (PACKAGE / 'benchmarking').exists()


def test_tools_and_benchmarks_do_not_edit_sys_path():
    scripts = list((REPO_ROOT / 'tools').glob('*.py')) + list(
        (REPO_ROOT / 'benchmarks').rglob('*.py'))
    offenders = [str(p.relative_to(REPO_ROOT)) for p in scripts
                 if 'sys.path.insert' in p.read_text() or 'sys.path.append' in p.read_text()]
    assert not offenders, offenders


# --- every module of the installed package is used by the product -------------------------
# The roots are the package's entry points: ``lrpet_mm/__init__.py`` and the components that
# what it imports registers into mmengine's registries (configs reach them by ``type=``), the
# modules a config names in ``custom_imports``, and the scripts in tools/. A module is used
# when a root or a used module imports it, a name from it, or a name a package ``__init__``
# re-exports from it; the re-export alone is no use (else ``import lrpet_mm`` running every
# subpackage's ``__init__`` would make every module look used).

Reexports = Dict[str, Dict[str, Tuple[str, str]]]


def package_modules() -> Dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob('*.py')}


def reexports(init: Path) -> Dict[str, Tuple[str, str]]:
    """What a package ``__init__`` binds by ``from M import name as alias``: alias → (M, name)."""
    bound = {}
    for node in ast.parse(init.read_text(), str(init)).body:
        if isinstance(node, ast.ImportFrom):
            source = from_target(node, init)
            bound.update({alias.asname or alias.name: (source, alias.name)
                          for alias in node.names})
    return bound


def package_reexports(modules: Dict[str, Path]) -> Reexports:
    """:func:`reexports` of every package of ``modules``, by package name."""
    return {name: reexports(path) for name, path in modules.items()
            if path.name == '__init__.py'}


def resolve(target: str, name: Optional[str], known: Set[str],
            bound: Reexports) -> Optional[str]:
    """The ``lrpet_mm`` module that ``from target import name`` uses (``import target`` when
    ``name`` is None): the module a package's ``__init__`` re-exports ``name`` from, followed
    through every re-export, a submodule, or ``target`` itself; None outside the package."""
    seen = set()
    while name is not None and (target, name) not in seen:
        seen.add((target, name))
        source, original = bound.get(target, {}).get(name, (target, name))
        if source == target:  # not re-exported, or `from . import submodule`
            break
        target, name = source, original
    if name is not None and f'{target}.{name}' in known:
        return f'{target}.{name}'
    return target if target in known else None


def used_modules(path: Path, known: Set[str], bound: Reexports) -> Set[str]:
    """The ``lrpet_mm`` modules a file uses, anywhere in it. A package ``__init__`` uses
    nothing: its imports are re-exports, counted for the module a name comes from where a
    file imports that name through the package."""
    if path.name == '__init__.py' and PACKAGE in path.parents:
        return set()
    used = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            used.update(resolve(alias.name, None, known, bound) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = from_target(node, path)
            used.update(resolve(target, alias.name, known, bound) for alias in node.names)
    return used - {None}


def closure(start: Iterable[str], edges: Dict[str, Set[str]]) -> Set[str]:
    """``start`` and everything reachable from it; a module reaches its parent packages."""
    reached: Set[str] = set()
    todo = list(start)
    while todo:
        node = todo.pop()
        if node in reached:
            continue
        reached.add(node)
        parts = node.split('.')
        todo.extend('.'.join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(edges.get(node, ()))
    return reached


def registers_a_component(path: Path) -> bool:
    """Whether the file registers a class into an mmengine registry (``X.register_module``):
    configs reach it by ``type=...`` once ``import lrpet_mm`` has run it."""
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and node.func.attr == 'register_module'
               for node in ast.walk(ast.parse(path.read_text(), str(path))))


def config_imports() -> Set[str]:
    """``lrpet_mm`` modules that a config (configs/, or one docs/*.md tells users to write)
    names in its ``custom_imports``."""
    files = list((REPO_ROOT / 'configs').rglob('*.py')) + list((REPO_ROOT / 'docs').glob('*.md'))
    names = set()
    for path in files:
        for listed in re.findall(r'custom_imports\s*=\s*dict\(\s*imports\s*=\s*\[([^\]]*)\]',
                                 path.read_text()):
            names.update(re.findall(r"""['"](lrpet_mm[\w.]*)['"]""", listed))
    return names


def unused_package_modules(scripts: Iterable[Path]) -> List[str]:
    """The ``lrpet_mm`` modules that nothing uses from the package's entry points: the
    components ``import lrpet_mm`` registers, the modules configs import, and ``scripts``."""
    modules = package_modules()
    known, bound = set(modules), package_reexports(modules)
    # what `import lrpet_mm` executes: every import of every module it reaches, re-exports too
    executed = closure(['lrpet_mm'], {name: imported_modules(path)
                                      for name, path in modules.items()})
    roots = {'lrpet_mm'} | config_imports() | {
        name for name in executed if registers_a_component(modules[name])}
    for script in scripts:
        roots |= used_modules(script, known, bound)
    reached = closure(roots, {name: used_modules(path, known, bound)
                              for name, path in modules.items()})
    return sorted(known - reached)


def test_a_re_export_is_resolved_to_the_module_that_defines_the_name():
    modules = package_modules()
    bound = package_reexports(modules)
    assert resolve('lrpet_mm.models', 'factorize_model', set(modules), bound) == (
        'lrpet_mm.models.compact_model')
    assert resolve('lrpet_mm.engine', 'checkpoint_meta', set(modules), bound) == (
        'lrpet_mm.engine.checkpoint_meta')
    assert resolve('torch', 'nn', set(modules), bound) is None


def test_a_module_used_only_by_benchmarks_or_tests_is_found():
    # without tools/ as entry points, the tools' modules are used by no one: the check fails
    # with their names (a package __init__ re-exporting them does not count as a use)
    unused = unused_package_modules([])
    assert {'lrpet_mm.deploy.onnx_export', 'lrpet_mm.deploy.mmdeploy_export'} <= set(unused)


def test_every_package_module_is_used_by_the_product():
    unused = unused_package_modules((REPO_ROOT / 'tools').glob('*.py'))
    assert not unused, (
        f'modules of the installed package that only benchmarks/ or tests/ use (move them to '
        f'benchmarks/benchlib/ or tests/): {unused}')
