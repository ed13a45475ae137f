"""meshpool.graph.dot: DOT text for graphs, and visualize() writing and rendering it."""

from __future__ import annotations

import os
import re
import stat
import sys

import pytest

from meshpool.graph import delayed, graph_spec, spec_to_dot, to_dot, visualize
from meshpool.graph.dot import collect_spec


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def parse(dot: str) -> tuple[dict[str, tuple[str, str]], set[tuple[str, str]]]:
    """Nodes ``{id: (label, shape)}`` and edges ``{(src, dst)}`` of our DOT output."""
    nodes = {
        m[1]: (m[2].replace('\\"', '"'), m[3])
        for m in re.finditer(r'^  (\w+) \[label="((?:[^"\\]|\\.)*)", shape=(\w+)', dot, re.M)
    }
    edges = set(re.findall(r"^  (\w+) -> (\w+);$", dot, re.M))
    return nodes, edges


def labelled(dot: str) -> set[tuple[str, str]]:
    """Edges as (source label, target label)."""
    nodes, edges = parse(dot)
    return {(nodes[a][0], nodes[b][0]) for a, b in edges}


def test_data_and_task_nodes():
    dsk = {"x": 1, "y": (inc, "x"), "z": (add, "x", "y")}
    dot = to_dot(dsk)
    assert dot.startswith('digraph "meshpool" {') and dot.endswith("}")
    nodes, edges = parse(dot)
    assert sorted(nodes.values()) == sorted(
        [("x", "box"), ("y", "box"), ("z", "box"), ("inc", "circle"), ("add", "circle")]
    )
    assert labelled(dot) == {("inc", "y"), ("x", "inc"), ("add", "z"), ("x", "add"), ("y", "add")}
    assert to_dot(dsk) == dot  # deterministic


def test_aliases_lists_and_tuple_keys():
    dsk = {("x", 0): 1, ("x", 1): 2, "all": [("x", 0), ("x", 1)], "same": "all"}
    assert graph_spec(dsk) == {
        ("x", 0): (None, []),
        ("x", 1): (None, []),
        "all": ("list", [("x", 0), ("x", 1)]),
        "same": ("alias", ["all"]),
    }
    edges = labelled(to_dot(dsk))
    assert ("('x', 0)", "list") in edges and ("all", "alias") in edges


def test_labels_are_escaped_and_shortened():
    dot = spec_to_dot({'say "hi"\\': (None, []), "k" * 100: ("f", ['say "hi"\\'])})
    assert 'label="say \\"hi\\"\\\\"' in dot
    assert "k" * 37 + "..." in dot and "k" * 38 not in dot
    assert "rankdir=LR" in spec_to_dot({}, rankdir="LR")


def test_external_dependencies_are_dashed():
    dot = spec_to_dot({"b": ("inc", ["a"])})
    assert 'd1 [label="a", shape=box, style=dashed];' in dot


def test_delayed_and_meshpool_graph_objects():
    class FakeFuture:
        def __meshpool_graph__(self):
            return {"f-1": ("load", []), "f-2": ("inc", ("f-1",))}

    d = delayed(inc, pure=True)(delayed(1, name="one"), dask_key_name="two")
    spec = collect_spec([d, FakeFuture(), {"x": 1}])
    assert spec == {
        "one": (None, []),
        "two": ("inc", ["one"]),
        "f-1": ("load", []),
        "f-2": ("inc", ["f-1"]),
        "x": (None, []),
    }
    with pytest.raises(TypeError, match="cannot draw"):
        collect_spec(42)


def test_apply_tasks_are_labelled_by_the_called_function():
    d = delayed(pow)(2, 3, mod=5)
    assert ("pow", d.key) in labelled(to_dot(d.dask))


def test_visualize_writes_dot(tmp_path):
    d = delayed(inc)(1)
    paths = visualize(d, filename=str(tmp_path / "g"))
    assert paths == [str(tmp_path / "g.dot")]
    text = (tmp_path / "g.dot").read_text()
    assert "inc" in text and text.endswith("}\n")
    assert d.visualize(filename=str(tmp_path / "h.dot")) == [str(tmp_path / "h.dot")]
    assert visualize({"a": 1}, str(tmp_path / "graph.v1")) == [str(tmp_path / "graph.v1.dot")]


def test_visualize_without_graphviz_warns(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.warns(UserWarning, match="'dot' is not on PATH"):
        paths = visualize({"a": 1}, filename=str(tmp_path / "g.svg"))
    assert paths == [str(tmp_path / "g.dot")]


@pytest.mark.skipif(sys.platform == "win32", reason="uses a shell script as a fake 'dot'")
def test_visualize_renders_with_dot(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "dot"
    # A fake Graphviz: records its arguments into the output file.
    fake.write_text('#!/bin/sh\nshift 2\nprintf "%s\\n" "$*" > "$2"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ.get("PATH", ""))
    base = tmp_path / "graph"
    paths = visualize([delayed(inc)(1)], filename=str(base) + ".png")
    assert paths == [str(base) + ".dot", str(base) + ".png"]
    assert (tmp_path / "graph.png").read_text().split()[0] == "-o"
    paths = visualize({"a": 1}, filename=str(base), format="svg")
    assert paths[-1] == str(base) + ".svg"
