"""The committed man pages and completions match what the app generates now."""

from pathlib import Path

from cryocli.docs.generate import generate
from tests.conftest import REPO


def test_man_and_completions_up_to_date(tmp_path: Path) -> None:
    written = generate(tmp_path)
    stale = []
    for path in written:
        rel = path.relative_to(tmp_path)
        committed = REPO / rel
        if not committed.exists() or committed.read_text() != path.read_text():
            stale.append(str(rel))
    extra = {p.relative_to(REPO) for d in ("man", "completions") for p in (REPO / d).glob("*")} - {
        p.relative_to(tmp_path) for p in written}
    assert not stale and not extra, (
        f"out of date: {stale}, no longer generated: {sorted(map(str, extra))}; "
        "run `.venv/bin/python -m cryocli.docs.generate`")


def test_every_command_has_a_man_page(tmp_path: Path) -> None:
    import typer

    from cryocli.cli.app import app

    root = typer.main.get_command(app)
    generate(tmp_path)
    for name in root.commands:
        page = (tmp_path / "man" / f"cryocli-{name}.1").read_text()
        assert ".SH OPTIONS" in page or ".SH DESCRIPTION" in page


def test_bracketed_defaults_survive_rich_help_and_markup_stays_out_of_man_pages(tmp_path: Path) -> None:
    """rich reads ``[default: 25]`` in an option's help as a markup tag and drops it unless escaped; the
    man pages get plain text, without the commands' ``[bold]`` markup."""
    from typer.testing import CliRunner

    from cryocli.cli.app import app

    result = CliRunner().invoke(app, ["refine", "--help"], env={"COLUMNS": "250", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    assert "[default: 25]" in result.output
    assert "[default: detect]" in result.output
    generate(tmp_path)
    page = (tmp_path / "man" / "cryocli-refine.1").read_text()
    assert "[default: 25]" in page and "[bold]" not in page and "\\[default" not in page
