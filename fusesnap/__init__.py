"""fusesnap: virtual block images over FUSE, for loop devices to sit on.

Layers, top to bottom (each module's docstring says what it owns and its
concurrency contract):

| module        | owns                                                              |
|---------------|-------------------------------------------------------------------|
| cli           | the command line: parsing, one-line errors, exit statuses         |
| mount         | the server process: images in, pyfuse3 + trio main loop, teardown |
| control       | the CLI side of the control channel: find a mount, status, commands |
| fs            | the FUSE adapter: inodes, attributes, errno mapping, control      |
| images        | one module per image type, behind `images.base.Image`             |
| formats       | on-disk formats, pure (pack, unpack, validate)                    |
| rangemap      | the sorted-range map every image keeps its block state in         |
| copy_before_write | chunk locks, group commit: old data copied durably before it is overwritten |
| similarity    | the similarity index over OLD that v1 diffs are compressed against |
| devices       | backing devices: path rules, size, positional I/O, discard        |
| diffing       | `fusesnap diff` / `diff-info`: making and checking update diffs   |
| upgrade       | `fusesnap upgrade`: handing a live mount to a new server process  |
| supervisor    | crash failover: keeps the FUSE connection, starts a successor     |
| errors        | `UserError` and the exit statuses                                 |

Only `fs`, `mount`, `upgrade` and `supervisor` know about FUSE; everything below them
is plain Python.
`arguments` holds the argparse types every command uses (paths resolved in the
caller's directory); `pyfuse3_build` installs the patched pyfuse3 (stdlib only).
"""

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)
