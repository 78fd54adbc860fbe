"""Reading an upper directory back: diff, commit, export."""
