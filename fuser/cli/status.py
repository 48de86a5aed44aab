"""Exit statuses: 0 done, 1 the work failed, 2 bad usage or bad input."""

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
