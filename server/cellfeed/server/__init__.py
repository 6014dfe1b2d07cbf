"""cellfeed."""
