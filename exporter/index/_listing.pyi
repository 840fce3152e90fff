# The C loop's interface (exporter/index/_listing.c, where each field is described).

Listing = tuple[
    str,  # regular files' names, in listing order, joined by NUL ("" for none)
    int,  # how many regular files
    bytes,  # their st_size: native int64, for array("q").frombytes
    bytes,  # their st_blocks: native uint32 (array "I"), or int64 when the next field is True
    bool,  # wide: a block count did not fit in 4 bytes
    list[tuple[int, int, int]],  # (position in names, st_dev, st_ino) of files with more than one link
    float,  # max of `changed` and every file's st_mtime and st_ctime
    list[tuple[str, float, int, int]],  # subdirectories: (name, max(st_mtime, st_ctime), st_dev, st_ino)
    int,  # 0, or the errno that stopped the listing
]

def list_dir(fd: int, changed: float, /) -> Listing: ...
