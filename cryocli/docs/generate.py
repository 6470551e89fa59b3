"""Generate the man pages (``man/``) and shell completions (``completions/``) from the typer app.

Run ``python -m cryocli.docs.generate`` after changing any command or option; a test regenerates
everything into a temporary folder and fails when the committed files differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
import typer._completion_shared as typer_completion
from rich.text import Text

from cryocli import __version__
from cryocli.cli.app import app

PROG = "cryocli"
COMPLETE_VAR = "_CRYOCLI_COMPLETE"
SHELLS = {"bash": "cryocli.bash", "zsh": "_cryocli", "fish": "cryocli.fish"}


def _roff(text: str) -> str:
    # The help is rich markup (``[bold]``, escaped ``\\[default: ...]``); man pages take the plain text.
    text = " ".join(Text.from_markup(text or "").plain.split())
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return ("\\&" + text) if text.startswith((".", "'")) else text


def _is_group(command) -> bool:
    return hasattr(command, "commands")


def _param_lines(param) -> list[str]:
    # typer ships its own copy of click, so parameters are recognised by their type name, not class.
    if param.param_type_name == "argument":
        return [".TP", f"\\fI{param.name.upper()}\\fR", _roff(getattr(param, "help", "") or "")]
    if param.param_type_name != "option" or getattr(param, "hidden", False):
        return []
    names = ", ".join(f"\\fB{_roff(o)}\\fR" for o in [*param.opts, *param.secondary_opts])
    help_text = param.help or ""
    if param.show_default and param.default not in (None, False, "", ()) and not callable(param.default):
        help_text += f" [default: {param.default}]"
    return [".TP", names, _roff(help_text)]


def man_page(command, name: str, parent: str | None = None) -> str:
    """roff source of one man page for ``command`` (the root when ``parent`` is None)."""
    title = name.upper().replace(" ", "-")
    full = name.replace("-", " ")
    help_text = (command.help or "").strip()
    summary = help_text.split("\n\n")[0]
    lines = [f'.TH {title} 1 "" "{PROG} {__version__}" "cryocli manual"', ".SH NAME",
             f"{_roff(name)} \\- {_roff(summary)}", ".SH SYNOPSIS",
             f"\\fB{_roff(full)}\\fR [OPTIONS]" + (" COMMAND [ARGS]..." if _is_group(command) else
                                                  "".join(f" {p.name.upper()}" for p in command.params
                                                          if p.param_type_name == "argument")),
             ".SH DESCRIPTION"]
    lines += [_roff(par) + "\n.PP" for par in help_text.split("\n\n")]
    params = [line for p in command.params for line in _param_lines(p)]
    if params:
        lines += [".SH OPTIONS", *params]
    if _is_group(command):
        lines.append(".SH COMMANDS")
        for sub_name, sub in sorted(command.commands.items()):
            lines += [".TP", f"\\fB{sub_name}\\fR", _roff((sub.help or "").split("\n\n")[0]),
                      f"See \\fB{PROG}-{sub_name}\\fR(1)."]
    lines += [".SH SEE ALSO", f"\\fB{parent}\\fR(1)" if parent else "The README of cryocli."]
    return "\n".join(lines) + "\n"


def generate(out: Path) -> list[Path]:
    """Write every man page and completion script under ``out``; returns the files written."""
    root = typer.main.get_command(app)
    assert isinstance(root, typer.core.TyperGroup)  # the app has a callback and several commands: a group
    written: list[Path] = []
    (out / "man").mkdir(parents=True, exist_ok=True)
    (out / "completions").mkdir(parents=True, exist_ok=True)
    pages = {f"{PROG}.1": man_page(root, PROG)}
    for sub_name, sub in root.commands.items():
        pages[f"{PROG}-{sub_name}.1"] = man_page(sub, f"{PROG}-{sub_name}", parent=PROG)
    for file_name, text in pages.items():
        (out / "man" / file_name).write_text(text)
        written.append(out / "man" / file_name)
    for shell, file_name in SHELLS.items():
        script = typer_completion.get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell)
        (out / "completions" / file_name).write_text(script.rstrip() + "\n")
        written.append(out / "completions" / file_name)
    return written


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2]
    for path in generate(out):
        print(path)


if __name__ == "__main__":
    main()
