"""Views: core data -> Reply/Message. Pure functions; buttons are passed in."""
