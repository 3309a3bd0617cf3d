"""The HTTP api: authentication, validation, turn starts and the Redis-to-SSE relay."""
