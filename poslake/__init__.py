"""poslake's operator command line."""
