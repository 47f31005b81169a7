"""The layering of src/, checked on the import graph (module-level and function-level imports).

Lower layers never import higher ones:
- data (rendering, shards, loaders) never imports models, flow, callbacks or eval;
- flow/ and sampling/ are pure tensor code: they import only each other;
- the networks (DiT, its layers, the causal VAE network) never import Lightning, the encoders'
  wrappers or the LightningModule;
- utils never import the LightningModules, callbacks, eval or the entry points;
- nothing imports an entry point (src/train.py, sample.py, ...), and there are no cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ENTRY_POINTS = {"src.train", "src.sample", "src.extract", "src.convert", "src.report"}
NETS = {
    "src.models.dit",
    "src.models.layers",
    "src.models.vae.layers",
    "src.models.vae.causal_vae",
}
MODULE_WIRING = {
    "src.models.pyramid_module",
    "src.models.vae_module",
    "src.models.checkpoint",
    "src.models.autoencoders",
    "src.models.text_encoders",
    "src.models.conditioning",
    "src.models.vae.frozen",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """src modules and top-level packages imported anywhere in the file (also in functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m if m.startswith("src") else m.split(".")[0] for m in out}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    if "src.eval" in files and (SRC / "eval.py").is_file():
        files["src.eval_cli"] = files.pop("src.eval")  # src/eval.py beside the src/eval package
        files["src.eval"] = SRC / "eval" / "__init__.py"
    known = set(files)
    return {name: imports_of(path, known) for name, path in files.items()}


def violations(graph, sources, allowed) -> list[str]:
    return sorted(
        f"{m} imports {dep}"
        for m, deps in graph.items()
        if sources(m)
        for dep in deps
        if dep.startswith("src") and not allowed(dep)
    )


def test_data_never_imports_higher_layers(graph):
    bad = violations(
        graph,
        lambda m: m.startswith("src.data"),
        lambda d: d.startswith(("src.data", "src.utils")),
    )
    assert not bad, bad


def test_flow_and_sampling_are_pure_tensor_code(graph):
    bad = violations(
        graph,
        lambda m: m.startswith(("src.flow", "src.sampling")),
        lambda d: d.startswith(("src.flow", "src.sampling")),
    )
    assert not bad, bad
    heavy = {"lightning", "hydra", "omegaconf", "transformers"}
    uses = [f"{m} imports {d}" for m, ds in graph.items() if m.startswith("src.flow") for d in ds]
    assert not [u for u in uses if u.split()[-1] in heavy], uses


def test_networks_know_nothing_of_lightning_or_encoder_wrappers(graph):
    for net in NETS:
        deps = graph[net]
        assert "lightning" not in deps, net
        assert not deps & MODULE_WIRING, (net, deps & MODULE_WIRING)


def test_utils_never_import_modules_callbacks_eval_or_entry_points(graph):
    high = MODULE_WIRING | ENTRY_POINTS | {"src.eval_cli"}
    bad = violations(
        graph,
        lambda m: m.startswith("src.utils"),
        lambda d: d not in high and not d.startswith(("src.callbacks", "src.eval")),
    )
    assert not bad, bad


def test_nothing_imports_an_entry_point(graph):
    bad = [f"{m} imports {d}" for m, ds in graph.items() for d in ds & ENTRY_POINTS]
    assert not bad, bad


def test_no_import_cycles(graph):
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail(" -> ".join(cycle))


def test_the_checker_sees_a_violation():
    """The rules catch what they should: a data module importing a model is reported."""
    fake = {"src.data.x": {"src.models.dit"}, "src.models.dit": set()}
    assert violations(fake, lambda m: m.startswith("src.data"), lambda d: "data" in d)
