"""Long-lived bot processes that hold a platform's own connection (the Discord Gateway). Never imported by the api or the worker."""
