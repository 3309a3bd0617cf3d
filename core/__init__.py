"""Cross-cutting foundations: settings, logging, errors and the turn contracts. Imports nothing of the project."""
