"""The FUSE adapter: a protocol translator between pyfuse3 and the images.

It owns the inode table (the root directory, one file per image, `.status` and
`.status.json`), builds attributes, and maps errors. The set of image files may
change while mounted (snapshots come and go): `set_files` drops the gone names and
asks the kernel to drop its cached entries of names that went or now mean another
image. The invalidation is queued (pyfuse3.invalidate_entry_async), never done
inside the request handler that caused it, which would deadlock on the kernel's lock
of the directory. For I/O it finds the image of a file handle and calls
`read/write/discard/flush` on it; nothing else happens here.

Numbers a fresh server reproduces (crash failover, fusesnap/supervisor.py): a
successor started after a crash knows nothing of the dead server's tables, but the
kernel keeps the inode numbers and file handles it was given. So an image file's
inode is a function of what the file is (`inode_for`: its name and the name of the
image it means; a snapshot's image name carries its never-reused number), and the
handle of an open image file is that inode. An open handle keeps the image it
opened as long as the mount has it under any name (snapshot.img opened before a new
take keeps the older snapshot); a dropped image's handle answers EIO. Status files
are rendered at open; a successor renders them again at the next read.

Error boundary: every handler that can fail funnels exceptions through
`_to_fuse_error` (the rest only raise FUSEError themselves), so only `FUSEError`
ever leaves a handler. `OSError` keeps its errno (EIO, ENOSPC, EROFS ...);
anything else is a bug: it is logged with its traceback and that one request gets EIO.

Control: the root directory's extended attributes are the control channel the CLI
uses (`user.fusesnap.pid` to read, `user.fusesnap.command` to act).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import time
from typing import Awaitable, Callable

import pyfuse3

from .control import XATTR_COMMAND, XATTR_PID
from .devices import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
from .images.base import Image

log = logging.getLogger(__name__)

STATUS_FILES = (".status", ".status.json")
_FIRST_FILE_INODE = pyfuse3.ROOT_INODE + 1   # the status files' inodes follow the root
# Image inodes (and handles) have this bit set: status-file handles stay below it.
IMAGE_INODE_BIT = 1 << 48
STATUS_HANDLE_STEP = 4  # a status file's handle: a counter times this, plus its inode (2 or 3)


def inode_for(name: str, image: Image) -> int:
    """The inode of file `name` meaning `image`: the same in every server of a mount
    (64 bits of a hash: numbering by order of appearance would differ in a successor
    and send a cached inode's I/O to another image)."""
    digest = hashlib.blake2b(f"{name}\0{image.name}".encode(), digest_size=8).digest()
    return IMAGE_INODE_BIT | int.from_bytes(digest, "little") % IMAGE_INODE_BIT


def _to_fuse_error(exc: Exception, what: str) -> pyfuse3.FUSEError:
    """The one place where exceptions become errnos."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, OSError) and exc.errno:
        log.debug("%s: %s", what, exc)
        return pyfuse3.FUSEError(exc.errno)
    log.error("%s failed unexpectedly, answering EIO", what, exc_info=exc)
    return pyfuse3.FUSEError(errno.EIO)


class StatusRenderer:
    """Renders `.status` (one line per image, like `dmsetup status`) and `.status.json`
    (the images, beside `mount_figures`: facts about the whole mount)."""

    def __init__(self, images: list[Image], mount_figures: dict | None = None):
        self.images = images
        self.mount_figures = mount_figures or {}
        #: figures of the server process for .status.json (version, upgrades; mount.py)
        self.server_status: Callable[[], dict] | None = None

    def set_images(self, images: list[Image]) -> None:
        self.images = images

    def as_dict(self) -> dict:
        figures = {**self.mount_figures,
                   "images": {img.name: {"target": img.target, **img.status()} for img in self.images}}
        if self.server_status is not None:
            figures["server"] = self.server_status()
        return figures

    def as_text(self) -> str:
        lines = []
        for img in self.images:
            figures = img.status()
            fields = " ".join(str(figures[key]) for key in img.status_line_keys)
            lines.append(f"{img.name}: {img.target} {fields}".rstrip())
        return "".join(line + "\n" for line in lines)

    def render(self, file_name: str) -> bytes:
        if file_name == ".status.json":
            return (json.dumps(self.as_dict(), indent=1, sort_keys=True) + "\n").encode()
        return self.as_text().encode()


class FuseOperations(pyfuse3.Operations):
    """pyfuse3 handlers for a flat directory of images and status files."""

    # Async requests (a loop device's direct I/O) the kernel keeps in flight, through
    # the max-background pyfuse3 patch; its default of 12 capped fio's qd16 at 12, and
    # backup-on-write's group commit shares each fsync only among writes in flight.
    max_background = 64

    def __init__(self, files: list[tuple[str, Image]], control: Callable[[str], Awaitable[None]],
                 mount_figures: dict | None = None):
        super().__init__()
        self.status = StatusRenderer([], mount_figures)
        self.control = control
        self.mount_time_ns = time.time_ns()
        # inode -> Image, or the name of a status file
        self.by_inode: dict[int, Image | str] = {}
        self.by_name: dict[bytes, int] = {}
        for inode, name in enumerate(STATUS_FILES, start=_FIRST_FILE_INODE):
            self.by_inode[inode] = name
            self.by_name[name.encode()] = inode
        # handle of an open image file (its inode, under any name the image has) -> Image
        self.image_handles: dict[int, Image] = {}
        self.set_files(files)
        # file handle -> the bytes of a status file rendered at open (or, handed over by
        # an older server in a live upgrade, the Image of a handle numbered its way)
        self.open_files: dict[int, Image | bytes] = {}
        self.next_fh = 1

    def set_files(self, files: list[tuple[str, Image]]) -> None:
        """The image files now in the mount (sync: the tables change at once)."""
        old_names = {name: inode for name, inode in self.by_name.items()
                     if isinstance(self.by_inode[inode], Image)}
        for name, inode in old_names.items():
            del self.by_inode[inode]
            del self.by_name[name]
        images: list[Image] = []
        for name, image in files:
            inode = inode_for(name, image)
            self.by_inode[inode] = image
            self.by_name[name.encode()] = inode
            if image not in images:
                images.append(image)
        self.image_handles = {inode_for(name, image): image
                              for name, _ in files for image in images}
        self.status.set_images(images)
        for name, inode in old_names.items():
            if self.by_name.get(name) != inode:
                pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, name, ignore_enoent=True)

    # -- attributes -------------------------------------------------------------

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_uid = 0
        attr.st_gid = 0
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self.mount_time_ns
        attr.st_blksize = 4096
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
            attr.st_size = 0
            attr.attr_timeout = attr.entry_timeout = 300
            return attr
        entry = self.by_inode.get(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_nlink = 1
        if isinstance(entry, Image):
            attr.st_mode = stat.S_IFREG | 0o600  # read-only images refuse writes at open: EROFS
            attr.st_size = entry.size
            attr.attr_timeout = attr.entry_timeout = 300
        else:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_size = len(self.status.render(entry))
            attr.attr_timeout = attr.entry_timeout = 0
        attr.st_blocks = (attr.st_size + 511) // 512
        return attr

    async def getattr(self, inode, ctx=None):
        try:
            return self._attributes(inode)
        except Exception as exc:
            raise _to_fuse_error(exc, "getattr") from None

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size:
            raise pyfuse3.FUSEError(errno.EPERM)  # images have the size of their device
        return await self.getattr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return await self.getattr(pyfuse3.ROOT_INODE)
        inode = self.by_name.get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(inode)

    # -- the directory ----------------------------------------------------------

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        try:
            entries = sorted(self.by_name.items())
            for index, (name, inode) in enumerate(entries[start_id:], start=start_id):
                if not pyfuse3.readdir_reply(token, name, self._attributes(inode), index + 1):
                    break
        except Exception as exc:
            raise _to_fuse_error(exc, "readdir") from None

    async def statfs(self, ctx):
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = 4096
        stats.f_files = len(self.by_inode) + 1
        stats.f_namemax = 255
        return stats

    # -- files ------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        try:
            entry = self.by_inode.get(inode)
            if entry is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            writing = flags & os.O_ACCMODE != os.O_RDONLY
            if isinstance(entry, Image):
                if writing and entry.read_only:
                    raise pyfuse3.FUSEError(errno.EROFS)
                opened: Image | bytes = entry
            else:
                if writing:
                    raise pyfuse3.FUSEError(errno.EACCES)
                # Rendered now, so a reader sees one consistent and current snapshot.
                opened = self.status.render(entry)
            if isinstance(opened, Image) and inode & IMAGE_INODE_BIT:
                fh = inode  # self-describing: a successor after a crash finds the image
            else:  # a status file, or an inode numbered by an older build (live upgrade)
                fh = self.next_fh * STATUS_HANDLE_STEP + inode % STATUS_HANDLE_STEP
                self.next_fh += 1
                self.open_files[fh] = opened
            # direct_io: no page cache in the FUSE layer. Status files are never
            # stale, and image data is cached once (by the loop device), not twice.
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        except Exception as exc:
            raise _to_fuse_error(exc, "open") from None

    def _opened(self, fh: int) -> Image | bytes:
        """What handle `fh` reads: see the module docstring."""
        opened = self.open_files.get(fh)
        if opened is not None:
            return opened
        if fh & IMAGE_INODE_BIT:
            image = self.image_handles.get(fh)
            if image is None:
                raise OSError(errno.EIO, "the image of this handle was dropped")
            return image
        # A status file opened before a crash: render it again.
        return self.status.render(self.by_inode[fh % STATUS_HANDLE_STEP])

    async def read(self, fh, off, size):
        try:
            opened = self._opened(fh)
            if isinstance(opened, bytes):
                return opened[off:off + size]
            return await opened.read(off, size)
        except Exception as exc:
            raise _to_fuse_error(exc, "read") from None

    def _image_open_for_writing(self, fh) -> Image:
        """The image behind a handle the kernel lets write (it checked the open mode;
        `open` refused write access to read-only images and status files)."""
        opened = self._opened(fh)
        if isinstance(opened, bytes):
            raise pyfuse3.FUSEError(errno.EBADF)
        return opened

    async def write(self, fh, off, buf):
        try:
            return await self._image_open_for_writing(fh).write(off, buf)
        except Exception as exc:
            raise _to_fuse_error(exc, "write") from None

    async def fallocate(self, fh, mode, offset, length):
        try:
            image = self._image_open_for_writing(fh)
            if mode == FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE:
                await image.discard(offset, length, zero_range=False)
            elif mode == FALLOC_FL_KEEP_SIZE | FALLOC_FL_ZERO_RANGE:
                await image.discard(offset, length, zero_range=True)
            elif mode == 0 and offset + length <= image.size:
                pass  # allocating inside a fixed-size device: nothing to do
            else:
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        except Exception as exc:
            raise _to_fuse_error(exc, "fallocate") from None

    async def fsync(self, fh, datasync):
        try:
            opened = self._opened(fh)
            if isinstance(opened, Image):
                await opened.flush()
        except Exception as exc:
            raise _to_fuse_error(exc, "fsync") from None

    async def flush(self, fh):
        pass  # close(2) of one descriptor; durability is fsync's job

    async def release(self, fh):
        self.open_files.pop(fh, None)

    # -- control ----------------------------------------------------------------

    async def getxattr(self, inode, name, ctx):
        if inode == pyfuse3.ROOT_INODE and name == XATTR_PID:
            return str(os.getpid()).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode, ctx):
        return [XATTR_PID] if inode == pyfuse3.ROOT_INODE else []

    async def setxattr(self, inode, name, value, ctx):
        if inode != pyfuse3.ROOT_INODE or name != XATTR_COMMAND:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        try:
            await self.control(value.decode())
        except ValueError as exc:
            log.warning("control command %r refused: %s", value, exc)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        except Exception as exc:
            raise _to_fuse_error(exc, "control") from None
