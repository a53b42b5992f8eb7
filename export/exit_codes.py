"""``lungseg-export``'s exit codes (shared by the parser and the commands)."""

EXIT_OK = 0
EXIT_PARITY_FAILED = 1
EXIT_USAGE = 2
EXIT_CHECKPOINT = 3
EXIT_ENGINE_IMPOSSIBLE = 4
EXIT_EXPORT_FAILED = 5
