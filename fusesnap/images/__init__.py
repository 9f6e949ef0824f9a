"""Image types: each module here is one kind of virtual block image.

| module    | image        | what it is                                                   |
|-----------|--------------|--------------------------------------------------------------|
| base      | -            | the `Image` interface the FUSE adapter calls                 |
| linear    | linear.img   | read-write pass-through of a device                          |
| update    | system.img   | update overlay: a device as updated by a diff, merged live   |
| bow       | bow.img      | backup-on-write (dm-bow): trim, checkpoint, commit, restore  |
| snapshot  | origin.img,  | copy-on-write snapshots with one shared store and change-    |
|           | snapshot*.img| block tracking (blksnap): take, release, list, changes       |

`IMAGE_TYPES` is the list `fusesnap mount` consults for its options and images.
"""

from . import bow, linear, snapshot, update

IMAGE_TYPES = (linear, update, bow, snapshot)
