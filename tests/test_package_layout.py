"""The package's architecture, read from its import statements (module level and lazy ones):
pure core → engine → compact model → report / deploy, with no import cycle."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

from helpers import REPO_ROOT

PACKAGE = REPO_ROOT / 'lrpet_mm'

#: Which subpackages each subpackage may import (the layering docs/development.md describes).
ALLOWED = {
    'lowrank': set(),
    'utils': set(),
    'workarounds': {'engine'},
    'datasets': set(),
    'engine': {'lowrank', 'utils'},
    'models': {'lowrank', 'engine', 'utils', 'datasets'},
    'report': {'lowrank', 'engine', 'models', 'utils'},
    'deploy': {'lowrank', 'engine', 'models', 'utils'},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


def imported_modules(path: Path) -> Set[str]:
    """Absolute names of the ``lrpet_mm`` modules/packages a file imports, anywhere in it."""
    package = module_name(path) if path.name == '__init__.py' else module_name(path.parent)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[:len(base) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ''
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
