"""Session-wide sandbox fleet fixtures."""
