"""The public endpoints of the providers durachat knows by name. Never imports temporalio/fastapi/sqlalchemy/redis.

A module of constants only, so naming a provider's endpoint does not import its SDK (anthropic and
google-genai take seconds to import; a process imports an adapter only when one is configured).
"""

from __future__ import annotations

from typing import Final

ANTHROPIC_BASE_URL: Final = "https://api.anthropic.com"
GEMINI_BASE_URL: Final = "https://generativelanguage.googleapis.com"
OLLAMA_BASE_URL: Final = "http://127.0.0.1:11434"
OPENAI_BASE_URL: Final = "https://api.openai.com/v1"
GROQ_BASE_URL: Final = "https://api.groq.com/openai/v1"
OPENROUTER_BASE_URL: Final = "https://openrouter.ai/api/v1"
