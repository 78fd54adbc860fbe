"""Mount lifecycle: options, the mount table, uppers, daemons, the engine layer store."""
