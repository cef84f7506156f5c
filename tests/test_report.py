"""The report: figures, table, HTML page, on synthetic run folders (no training)."""

from __future__ import annotations

import json
import math
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from report_fixtures import make_fake_run, remaining
from ticketlab.errors import TicketlabError
from ticketlab.io.report import (
    accuracy_figure,
    curves_figure,
    early_stop_figure,
    layers_figure,
    load_run,
    load_runs,
    log_tensorboard,
    report_html,
    summary_markdown,
    untrained_figure,
    write_report,
)

FIGURES = ("accuracy", "early_stop", "curves", "layers", "untrained")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append(value)


def _links(index: Path) -> _Links:
    parser = _Links()
    parser.feed(index.read_text(encoding="utf-8"))
    return parser


def _series(fig, ax_index: int = 0) -> dict[str, list[float]]:
    """Label -> x data of the labelled lines of one axes."""
    ax = fig.axes[ax_index]
    return {
        line.get_label(): list(line.get_xdata())
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    }


def _pcts(levels: range) -> list[float]:
    return [100 * remaining(level) for level in levels]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One report shared by the tests that only read it (rendering figures takes a while)."""
    run = make_fake_run(
        tmp_path_factory.mktemp("shared") / "run",
        levels=4,
        diverged=[(2, "ticket", 1)],
        config_extra='out = "runs/<script>alert(1)</script>"\n',
    )
    return write_report([run])


def test_writes_figures_page_and_markdown(report: Path) -> None:
    assert report.name == "index.html" and report.parent.name == "report"
    for stem in FIGURES:
        png, svg = report.parent / f"{stem}.png", report.parent / f"{stem}.svg"
        assert png.read_bytes().startswith(PNG_MAGIC), stem
        assert b"<svg" in svg.read_bytes()[:2000], stem
    assert (report.parent / "summary.md").stat().st_size > 0
    assert not list(report.parent.glob(".tmp-*")), "a temp file was left behind"
    assert (report.stat().st_mode & 0o777) == 0o644


def test_accuracy_figure_has_one_line_per_branch_on_the_papers_axis(tmp_path: Path) -> None:
    (run,) = load_runs([make_fake_run(tmp_path / "run", levels=4)])
    fig = accuracy_figure([run])
    for panel in (0, 1):  # early stop, end of training
        series = _series(fig, panel)
        assert list(series) == ["ticket", "reinit", "random_prune"]
        assert series["ticket"] == pytest.approx(_pcts(range(0, 5)))
        assert series["reinit"] == pytest.approx(_pcts(range(1, 5)))
        assert series["random_prune"] == pytest.approx(_pcts(range(1, 5)))
        ax = fig.axes[panel]
        assert ax.get_xscale() == "log"
        assert ax.xaxis_inverted(), "100% must be on the left"
        assert ax.get_xlabel() == "% of weights remaining"
        assert sorted(ax.get_xticks()) == pytest.approx(sorted(_pcts(range(0, 5))))
    # y is in % (the fixture's dense ticket: 0.90 and 0.91 -> 90.5)
    ticket = next(line for line in fig.axes[0].get_lines() if line.get_label() == "ticket")
    assert ticket.get_ydata()[0] == pytest.approx(90.5)
    # the winning ticket is marked
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "winning ticket" in labels


def test_other_branch_names_get_their_own_series(tmp_path: Path) -> None:
    branches = ("ticket", "reinit", "criterion:movement", "reset:signed_constant")
    (run,) = load_runs([make_fake_run(tmp_path / "run", branches=branches)])
    for build in (accuracy_figure, early_stop_figure, untrained_figure):
        assert list(_series(build([run]))) == list(branches)


def test_other_figures(tmp_path: Path) -> None:
    (run,) = load_runs([make_fake_run(tmp_path / "run", levels=8)])
    curves = curves_figure([run])
    labels = list(_series(curves))
    assert len(labels) == 4
    assert labels[0].startswith("100% (level 0)") and labels[-1].endswith("(level 8)")
    assert curves.axes[0].get_xlabel() == "Training iteration"
    layers = layers_figure([run])
    assert list(_series(layers)) == ["1.weight", "3.weight", "5.weight", "all layers"]
    assert layers.axes[0].xaxis_inverted()
    es = early_stop_figure([run])
    assert es.axes[0].get_xscale() == "log" and es.axes[0].xaxis_inverted()


def test_html_references_only_files_that_exist_and_nothing_external(report: Path) -> None:
    page = _links(report)
    assert page.refs, "no links at all"
    for ref in page.refs:
        if ref.startswith("data:"):  # inline (the empty favicon)
            continue
        assert "://" not in ref and not ref.startswith("//"), ref
        assert (report.parent / ref).is_file(), ref
    imgs = [ref for ref in page.refs if ref.endswith(".png")]
    assert sorted(imgs) == sorted(f"{stem}.png" for stem in FIGURES)
    assert "script" not in page.tags and "iframe" not in page.tags


def test_page_contents_are_escaped(report: Path) -> None:
    html = report.read_text()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Test CPU &lt;fast&gt;" in html  # run.json metadata, escaped
    assert "2.13.0+cpu" in html and "2025-01-01T12:00:00+00:00" in html
    assert "model = &quot;mnist1d_mlp&quot;" in html  # the config, verbatim


def test_table_and_winning_sentence(report: Path) -> None:
    html = report.read_text()
    md = (report.parent / "summary.md").read_text()
    # dense ticket: replicates 90% and 91% -> 90.5 ± 0.5; early stop at 400 and 500
    assert "90.5 ± 0.5" in html and "450 ± 50" in html
    assert "90.5 ± 0.5" in md and "| 0 | 100 |" in md
    assert "Smallest winning ticket: 41.0% of weights remaining (level 4)" in html
    assert "Smallest winning ticket" in md
    # the diverged network (level 2, ticket, replicate 1) is flagged, and left out of the mean
    assert '89.8 ± 0.0 <span class="warn">(1 diverged)</span>' in html
    assert "89.8 ± 0.0 (1 diverged)" in md


def _rows(path: Path) -> dict[int, dict]:
    return {row["level"]: row for row in load_run(path).rows}


@pytest.mark.parametrize("with_summary", [True, False])
def test_diverged_networks_are_excluded_and_flagged(tmp_path: Path, with_summary: bool) -> None:
    run = make_fake_run(tmp_path / "run", diverged=[(2, "ticket", 1)], summary=with_summary)
    ticket = _rows(run)[2]["branches"]["ticket"]
    # only replicate 0 counts: 0.90 - 0.001 * 2 (the diverged one would pull it to ~0.5)
    assert ticket["early_stop_test_acc"]["mean"] == pytest.approx(0.898)
    assert ticket["early_stop_test_acc"]["n"] == 1
    assert ticket["diverged"] == 1
    runs = load_runs([run])
    assert "89.8 ± 0.0 (1 diverged)" in summary_markdown(runs)
    assert "(1 diverged)" in report_html(runs, [])
    fig = accuracy_figure(runs)
    ticket_line = next(line for line in fig.axes[0].get_lines() if line.get_label() == "ticket")
    assert ticket_line.get_ydata()[2] == pytest.approx(89.8)


def test_all_replicates_diverged_leaves_a_gap_not_a_crash(tmp_path: Path) -> None:
    run = make_fake_run(tmp_path / "run", diverged=[(3, "reinit", 0), (3, "reinit", 1)])
    (data,) = load_runs([run])
    series = _series(accuracy_figure([data]))
    assert series["reinit"] == pytest.approx([100 * remaining(lv) for lv in (1, 2, 4)])
    assert "- (2 diverged)" in summary_markdown([data])


def test_run_without_summary_still_reports(tmp_path: Path) -> None:
    run = make_fake_run(tmp_path / "run", levels=3, summary=False)
    (data,) = load_runs([run])
    assert not data.finished
    assert [row["level"] for row in data.rows] == [0, 1, 2, 3]
    assert data.winning_ticket == {"level": 3, "weights_remaining": remaining(3)}
    html = write_report([run]).read_text()
    assert "not finished" in html
    assert html.count("<tr") == 2 + 4  # two header rows, four levels


def test_overlay_of_two_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = make_fake_run(tmp_path / "A", levels=3)
    b = make_fake_run(tmp_path / "B", levels=5, branches=("ticket", "reinit"))
    monkeypatch.chdir(tmp_path)
    index = write_report([a, b])
    assert index == tmp_path / "report_compare" / "index.html"
    runs = load_runs([a, b])
    series = _series(accuracy_figure(runs))
    assert list(series) == ["A:ticket", "A:reinit", "A:random_prune", "B:ticket", "B:reinit"]
    assert series["A:ticket"] == pytest.approx(_pcts(range(0, 4)))
    assert series["B:ticket"] == pytest.approx(_pcts(range(0, 6)))
    assert "A:ticket" in _series(early_stop_figure(runs)) and "B:ticket" in _series(
        early_stop_figure(runs)
    )
    assert len(curves_figure(runs).axes) == 2
    assert {"A:1.weight", "B:1.weight"} <= set(_series(layers_figure(runs)))
    html = index.read_text()
    assert "<h3>A</h3>" in html and "<h3>B</h3>" in html


def test_overlay_of_runs_with_the_same_folder_name(tmp_path: Path) -> None:
    a = make_fake_run(tmp_path / "x" / "run")
    b = make_fake_run(tmp_path / "y" / "run")
    assert [run.name for run in load_runs([a, b])] == ["x/run", "y/run"]


def test_custom_out_dir_rerun_and_no_untrained_figure(tmp_path: Path) -> None:
    run = make_fake_run(tmp_path / "run", levels=2, untrained=False)
    assert untrained_figure(load_runs([run])) is None
    first = write_report([run], tmp_path / "out")
    second = write_report([run], tmp_path / "out")  # replaces every file in place
    assert first == second == tmp_path / "out" / "index.html"
    assert not (tmp_path / "out" / "untrained.png").exists()
    assert "untrained.png" not in second.read_text()
    assert not (run / "report").exists()


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(TicketlabError, match="no such run folder"):
        write_report([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TicketlabError, match="no finished level"):
        write_report([tmp_path / "empty"])
    with pytest.raises(TicketlabError, match="at least one"):
        write_report([])
    run = make_fake_run(tmp_path / "run")
    (run / "summary.json").write_text("{not json")
    with pytest.raises(TicketlabError, match="summary.json"):
        write_report([run])
    (run / "summary.json").write_text('{"rows": [{"level": 0}]}')
    with pytest.raises(TicketlabError, match="damaged"):
        write_report([run])


def test_curve_nulls_are_skipped(tmp_path: Path) -> None:
    run = make_fake_run(tmp_path / "run", levels=2, replicates=2)
    path = run / "levels/level_00/metrics.json"
    metrics = json.loads(path.read_text())
    metrics["networks"][0]["curve"]["test_acc"][3] = None  # non-finite, stored as null
    path.write_text(json.dumps(metrics))
    fig = curves_figure(load_runs([run]))
    dense = fig.axes[0].get_lines()[0].get_ydata()
    assert all(math.isfinite(v) for v in dense)
    assert dense[3] == pytest.approx(100 * metrics["networks"][1]["curve"]["test_acc"][3])


def test_log_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = make_fake_run(tmp_path / "run", levels=3)
    log_dir = log_tensorboard(run)
    assert log_dir == run / "tensorboard"
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "ticket/early_stop_test_acc" in tags and "reinit/diverged" in tags
    steps = [e.step for e in events.Scalars("ticket/early_stop_test_acc")]
    assert steps == [0, 1, 2, 3]
    assert "curves/level_00/ticket/test_acc" in tags


def test_log_tensorboard_without_tensorboard(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(TicketlabError, match=r"pip install ticketlab\[tensorboard\]"):
        log_tensorboard(make_fake_run(tmp_path / "run"))
