"""Model adapters behind one contract (`providers.base`). Kept import-light: no re-exports here."""
