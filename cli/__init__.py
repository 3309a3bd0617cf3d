"""The `durachat` command line: dev stack, services, api, worker, migrations and API keys."""
