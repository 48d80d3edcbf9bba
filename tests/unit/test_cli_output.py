"""Text that comes from outside the program (model answers, engine logs, error messages,
paths) is printed verbatim by the rich tables and messages of the CLI: square brackets in it
are not taken for markup (dropped, or a MarkupError instead of the output)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from pdfabric.launch.demo import DemoRow, _table
from pdfabric.launch.plan import ProcSpec
from pdfabric.launch.runner import Proc, Runner

TRICKY = "[/x] INFO [core.py:12] [bold]not bold[/bold]"


def render(renderable: object) -> str:
    buf = io.StringIO()
    Console(file=buf, width=400, color_system=None).print(renderable)
    return buf.getvalue()


def test_demo_table_shows_a_model_answer_with_brackets_verbatim() -> None:
    row = DemoRow(question="what is [x]?", answer=TRICKY, ttft_s=0.1, total_s=0.2, transfer_id="t")
    out = render(_table([row]))
    assert "[/x] INFO [core.py:12] [bold]not" in out  # folded at 60 characters, brackets kept
    assert "what is [x]?" in out
    words = " ".join(out.split())  # the caption is wrapped to the table's width
    assert "The first question computes the whole document" in words  # why its kv wait is the long one


def test_launch_table_shows_names_and_log_paths_with_brackets(tmp_path: Path) -> None:
    spec = ProcSpec(name="decode-[0]", kind="engine", argv=["true"], env={}, ready_url="http://127.0.0.1:1/health")
    runner = Runner([spec], tmp_path / "[red]logs", Console(file=io.StringIO()))
    out = render(runner._table())
    assert "decode-[0]" in out and "[red]logs" in out


def test_status_table_shows_an_error_with_brackets(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from pdfabric.commands.status import _print

    monkeypatch.setenv("COLUMNS", "300")

    inst = {"name": "decode-0", "role": "decode", "url": "http://127.0.0.1:1", "draining": False,
            "healthy": False, "last_error": "[/x] refused", "in_flight": 0, "served": 0}
    _print([inst], 'pdfabric_proxy_errors_total{kind="[/x]"} 1', {"decode-0": {"error": "[/y] no reply"}}, None)
    out = capsys.readouterr().out
    assert "decode-0 is down: [/x] refused" in out and 'kind="[/x]"' in out
    assert "connector of decode-0: [/y] no reply" in out


def test_proc_tail_is_the_log_as_written(tmp_path: Path) -> None:
    log = tmp_path / "e.log"
    log.write_text("a\n" + TRICKY + "\n")
    spec = ProcSpec(name="e", kind="engine", argv=["true"], env={}, ready_url="http://127.0.0.1:1/health")
    assert Proc(spec, log).tail(1) == TRICKY
