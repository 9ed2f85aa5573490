"""What a reader of the report sees first: charts where nothing is cut off or covered, and ``report.tex``, the main
comparison as a booktabs table a paper can take (LaTeX special characters in variant names escaped)."""

import re

import matplotlib.pyplot as plt
import pytest
from matplotlib.text import Text

from clipqa.report import plots
from clipqa.report.comparison import make_folder_report
from clipqa.report.render import latex_escape
from tests.report.test_folders import BASE, BETTER, SAME, write_job

TYPES = ["object", "number", "color", "location"]
LONG = [
    "optimizer=adamw,optimizer.lr=0.001,mapper.num_layers=2",
    "optimizer=sgd,optimizer.lr=0.01,mapper.num_layers=2,freeze=none",
    "optimizer=adam,optimizer.lr=0.0001,mapper.num_layers=0",
    "freeze=staged",
]


def rows_compared() -> list[dict]:
    """Report rows of four variants with long names, three compared with the first (as paired.compare leaves them)."""
    rows = []
    for i, name in enumerate(LONG):
        acc = 0.55 + 0.1 * i  # high bars: where the legend once sat
        row = {"variant": name, "test/acc": acc, "ci_low": acc - 0.03, "ci_high": acc + 0.03, "test/prior_acc": 0.2}
        row |= {f"test/acc/{t}": min(0.97, acc + 0.05 * j) for j, t in enumerate(TYPES)}
        row |= {"baseline": LONG[0], "significant": i == 2}
        row |= {"diff": None} if i == 0 else {"diff": 0.1 * i, "diff_low": 0.1 * i - 0.04, "diff_high": 0.1 * i + 0.04}
        rows.append(row)
    return rows


def drawn(monkeypatch, draw) -> list:
    """The figures ``draw()`` saves (kept open: plt.close is held back)."""
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    draw()
    return figures


def outside(fig, monkeypatch) -> list[str]:
    """The texts drawn on the figure whose window extent leaves it (by more than half a pixel). Drawn: Text.draw
    ran for it (an axis keeps tick labels outside its limits that it does not draw)."""
    texts = []
    draw_text = Text.draw

    def record(self, renderer):
        texts.append(self)
        return draw_text(self, renderer)

    monkeypatch.setattr(Text, "draw", record)
    fig.canvas.draw()
    monkeypatch.setattr(Text, "draw", draw_text)
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    found = []
    for t in texts:
        if not t.get_visible() or not t.get_text().strip():
            continue
        e = t.get_window_extent(renderer)
        if e.x0 < box.x0 - 0.5 or e.y0 < box.y0 - 0.5 or e.x1 > box.x1 + 0.5 or e.y1 > box.y1 + 0.5:
            found.append(t.get_text())
    return found


def test_comparison_png_keeps_every_title_label_and_legend_inside_and_off_the_bars(tmp_path, monkeypatch):
    """The right panel's title and axis label were cut off and the legend sat over a bar."""
    (fig,) = drawn(monkeypatch, lambda: plots.comparison_chart(rows_compared(), tmp_path / "comparison.png"))
    try:
        assert (tmp_path / "comparison.png").stat().st_size > 5000
        assert outside(fig, monkeypatch) == []
        renderer = fig.canvas.get_renderer()
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
        bars = [p.get_window_extent(renderer) for ax in fig.axes for p in ax.patches]
        assert legends and bars
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert not any(box.overlaps(bar) for bar in bars), "the legend covers a bar"
        for ax in fig.axes:  # the variant names do not run into each other
            names = [t.get_window_extent(renderer) for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
            assert not any(a.overlaps(b) for i, a in enumerate(names) for b in names[i + 1 :]), "names overlap"
        titles = [ax.get_title() for ax in fig.axes]
        assert any("Paired difference" in t for t in titles)
    finally:
        plt.close("all")


def test_learning_curves_png_keeps_every_text_inside(tmp_path, monkeypatch):
    curves = {name: {"val/acc": [(1, 0.2), (9, 0.6)], "train/loss": [(1, 3.0), (9, 1.0)]} for name in LONG}
    (fig,) = drawn(monkeypatch, lambda: plots.learning_curves_chart(curves, tmp_path / "curves.png"))
    try:
        assert outside(fig, monkeypatch) == []
    finally:
        plt.close("all")


def test_long_names_are_wrapped_between_overrides_never_inside_one():
    assert plots.wrap_label("optimizer=adamw,optimizer.lr=0.001,mapper.num_layers=2") == (
        "optimizer=adamw,\noptimizer.lr=0.001,\nmapper.num_layers=2"
    )
    assert plots.wrap_label("freeze=text") == "freeze=text"


def test_latex_special_characters_are_escaped():
    assert latex_escape("a_b 50% x&y #1 {z} ~^\\") == (
        r"a\_b 50\% x\&y \#1 \{z\} \textasciitilde{}\textasciicircum{}\textbackslash{}"
    )


def test_report_tex_is_a_booktabs_table_of_the_main_comparison_with_significance_marks(tmp_path):
    sweep = tmp_path / "sweep"
    names = ["+note=base_1", "+note=50%_more&#2", "+note=same"]
    for num, (name, correct) in enumerate(zip(names, [BASE, BETTER, SAME], strict=True)):
        write_job(sweep, num, ["experiment=smoke", name], correct, 1)
    make_folder_report(sweep, tmp_path / "rep")
    tex = (tmp_path / "rep" / "report.tex").read_text()
    lines = tex.splitlines()
    assert "\\usepackage{booktabs}" in lines[0]
    for command in ("\\begin{table}[t]", "\\toprule", "\\midrule", "\\bottomrule", "\\end{tabular}", "\\end{table}"):
        assert command in lines
    body = lines[lines.index("\\midrule") + 1 : lines.index("\\bottomrule")]
    head = lines[lines.index("\\toprule") + 1]
    assert head.startswith("Variant & $n$ & Acc.\\ (\\%) & 95\\% CI") and "$p$ (Holm)" in head
    columns = re.compile(r"(?<!\\)&")  # an unescaped & starts a column
    assert all(len(columns.split(line)) == len(columns.split(head)) and line.endswith("\\\\") for line in body)
    cells = [[c.strip() for c in columns.split(line.removesuffix("\\\\"))] for line in body]
    by_name = {c[0]: c for c in cells}
    better = by_name[r"\texttt{+note=50\%\_more\&\#2}"]
    assert better[2:4] == ["85.0", "70.9--92.9"]
    assert better[4] == "$+35.0$$^{*}$" and better[5] == "$+15.7$ to $+51.0$"  # b=2, c=16 of 40: significant
    assert by_name[r"\texttt{+note=base\_1}"][4] == "baseline"
    assert by_name[r"\texttt{+note=same}"][4] == "$+0.0$" and by_name[r"\texttt{+note=same}"][6] == "1"
    assert "\\caption{clipqa sweep" in tex and "$^{*}$: $p < 0.05$" in tex


@pytest.mark.parametrize("name", ["x_y", "50%", "a&b", "#1"])
def test_no_raw_special_character_reaches_the_tex(name):
    escaped = latex_escape(name)
    assert all(escaped[i - 1] == "\\" for i, ch in enumerate(escaped) if ch in "_%&#")
