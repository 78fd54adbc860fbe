"""Everything that speaks HTTP: the distribution API client, auth, mirrors, search."""
