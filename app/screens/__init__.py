"""Screens pushed over the chat: models, settings, and small dialogs."""
