"""The `durachat` command: dev stack, embedded services, api, worker, Discord Gateway, migrations, keys and the load benchmark."""

from __future__ import annotations

import click

from cli.bench import bench
from cli.chats import chats_group
from cli.keys import keys
from core.logging import configure_logging
from core.settings import get_settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """durachat: durable multi-tenant AI chat. Every setting comes from DURACHAT_* environment variables."""
    configure_logging(get_settings())


@cli.command()
def dev() -> None:
    """Run the whole stack: embedded Temporal, Postgres and Redis, migrations, the worker and the api."""
    from cli.dev import run_dev

    run_dev(get_settings())


@cli.command()
def services() -> None:
    """Run only the embedded services and print the variables that point api and worker at them."""
    from cli.dev import run_services

    run_services(get_settings())


@cli.command()
def api() -> None:
    """Run the HTTP api (uvicorn)."""
    from api.app import serve

    serve(get_settings())


@cli.command()
def worker() -> None:
    """Run a Temporal worker for chat turns."""
    from worker import main as run_worker

    run_worker()


@cli.command("discord-gateway")
def discord_gateway() -> None:
    """Hold the Discord Gateway for every connected application: bot mentions start turns, a 🛑
    reaction stops one. Optional: slash commands need only the api."""
    from bots.discord_gateway import serve

    serve(get_settings())


@cli.command()
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def migrate(revision: str) -> None:
    """Apply the database migrations."""
    from storage.migrations import upgrade_database

    upgrade_database(get_settings().resolved_database_url, revision)
    click.echo(f"database at {revision}")


cli.add_command(keys)
cli.add_command(chats_group)
cli.add_command(bench)


def main() -> None:
    cli()
