"""memtier launcher and command line."""
