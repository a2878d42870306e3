"""The benchmark plot names each tool the same way in every plot of every run."""

from __future__ import annotations

from benchmarks import tools
from benchmarks.report import OTHER_STYLE, TOOL_STYLES, tool_style


def _harness_tools() -> list[str]:
    """Every tool the save/restore cases measure."""
    return [t.name for t in tools.distckpt_variants()] + [
        tools.Raw.name,
        tools.TorchSave.name,
        tools.Dcp.name,
        tools.Earth2Studio.name,
    ]


def test_every_measured_tool_has_its_own_colour_and_marker():
    names = _harness_tools()
    styles = [tool_style(name) for name in names]
    assert OTHER_STYLE not in styles, [n for n in names if n not in TOOL_STYLES]
    assert len({c for c, _ in styles}) == len(names), "two tools share a colour"
    assert len({m for _, m in styles}) == len(names), "two tools share a marker"
