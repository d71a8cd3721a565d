"""Prefect flows that wire the DVC stages; they hold no step logic of their own."""
