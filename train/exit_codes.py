"""``lungseg-train``'s exit codes."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
