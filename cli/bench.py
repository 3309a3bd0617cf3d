"""`durachat bench`: the open-loop load benchmark (`benchmarks.load`) as a subcommand; imports it only when run."""

from __future__ import annotations

import logging

import click


@click.command(
    "bench",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    # `durachat bench --help` is the benchmark's own help, with every flag.
    add_help_option=False,
)
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def bench(context: click.Context, arguments: tuple[str, ...]) -> None:
    """Open-loop load on POST /v1/chats, stepped up until it saturates (`durachat bench --help`)."""
    # The report goes to stdout and progress to stderr; the CLI's INFO records (alembic's plugins
    # at import, a line per request from httpx) would bury the progress and cost the client CPU.
    # A private stack sends its own records to its log file (see benchmarks.rig).
    logging.getLogger().setLevel(logging.WARNING)
    try:
        from benchmarks.load import main
    except ModuleNotFoundError as error:
        if error.name is None or not error.name.startswith("benchmarks"):
            raise
        raise click.ClickException(
            "durachat bench runs from a source checkout: the benchmarks package is not installed "
            "with durachat"
        ) from error
    context.exit(main(list(arguments), prog="durachat bench"))
