"""Outside systems the handler talks to (the receiving server)."""
