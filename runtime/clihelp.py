"""Every Fate command's --help and --version: options in named groups (what a user reaches for
first, first), each with its default, and examples at the end."""

from __future__ import annotations

from importlib import metadata

import click

HELP_NAMES = ["-h", "--help"]


def version() -> str:
    try:
        return metadata.version("fate")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class FateCommand(click.Command):
    """click's command with `sections` ((title, [option names]), ...) and `examples` ([(command, what)])."""

    def __init__(self, *args, sections: tuple = (), examples: tuple = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.sections, self.examples = sections, examples

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = {p.name: p.get_help_record(ctx) for p in self.get_params(ctx) if isinstance(p, click.Option)}
        placed = set()
        for title, names in self.sections:
            records = [rows[n] for n in names if rows.get(n)]
            placed.update(names)
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)
        rest = [r for n, r in rows.items() if n not in placed and r]
        if rest:
            with formatter.section("Other options" if self.sections else "Options"):
                formatter.write_dl(rest)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if self.examples:
            with formatter.section("Examples"):
                for command, what in self.examples:
                    formatter.write_text(f"# {what}")
                    with formatter.indentation():
                        formatter.write_text(command)
        super().format_epilog(ctx, formatter)


def command(name: str, sections: tuple = (), examples: tuple = ()):
    """A Fate command: grouped help, defaults shown, -h, --version."""
    def decorate(function):
        function = click.version_option(version(), "--version", prog_name=name, message="%(prog)s %(version)s")(function)
        return click.command(name, cls=FateCommand, sections=sections, examples=examples,
                             context_settings={"help_option_names": HELP_NAMES, "show_default": True,
                                               "max_content_width": 110})(function)
    return decorate
