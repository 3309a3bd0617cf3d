"""Temporal activities of a chat turn: the only place a turn touches Postgres, Redis and providers."""
