"""Identifier generation for rows the service creates. Must never import api, workflows or activities."""

from __future__ import annotations

import uuid


def new_id() -> str:
    return str(uuid.uuid4())
