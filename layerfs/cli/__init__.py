"""The command line: parsing, docker-style output, exit codes."""
