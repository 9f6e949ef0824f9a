"""On-disk formats fusesnap reads and writes: pure code, no I/O policy, no FUSE."""
