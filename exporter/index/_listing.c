/* The scan's inner loop in C: list one open directory and lstat every entry relative to it.

   exporter/index/scan.py keeps the same loop in Python (`_list_plain`) as the fallback when this
   module is not built and as the oracle the tests hold it to (tests/test_scan_listing.py): the
   two must give identical results on any directory, error cases included.

   list_dir(fd, changed) -> (names, count, sizes, blocks, wide, hard, changed, dirs, error)
     names   the regular files' names, in listing order, joined by NUL into one str (names never
             hold a NUL), decoded as os.listdir decodes each; "" when there are none
     count   how many regular files
     sizes   their st_size, as the native int64 bytes array('q').frombytes takes
     blocks  their st_blocks: native uint32 bytes (array 'I'), or int64 when `wide` (one does not fit)
     hard    [(position in names, st_dev, st_ino)] for files with more than one link
     changed max(changed, each file's st_mtime and st_ctime), as floats computed as CPython's do
     dirs    [(name, max(st_mtime, st_ctime), st_dev, st_ino)] for the subdirectories
     error   0, or the errno that stopped the listing: a failed read of the directory keeps nothing
             (as os.listdir raises before any stat); a failed lstat other than ENOENT keeps the
             entries before it (as the Python loop, which stops at the first such error).
   Symlinks, devices, fifos and sockets are skipped; an entry gone before its lstat (ENOENT) too.
   The descriptor stays open and its position is left at the end; the caller closes it.
   The system calls run without the GIL: other threads of the daemon (HTTP, the updater) go on. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    size_t name_at; /* offset of the NUL-terminated name in the names buffer */
    size_t name_len;
    int is_dir;
    int64_t size;
    int64_t blocks;
    nlink_t nlink;
    dev_t dev;
    ino_t ino;
    double changed; /* max(mtime, ctime) */
} entry_t;

typedef struct {
    char *names;
    size_t names_len, names_cap;
    entry_t *entries;
    size_t count, cap;
} listing_t;

static void listing_free(listing_t *l) {
    free(l->names);
    free(l->entries);
}

/* Appends a name; -1 when out of memory. */
static int add_name(listing_t *l, const char *name, size_t len) {
    if (l->names_len + len + 1 > l->names_cap) {
        size_t cap = l->names_cap ? l->names_cap : 4096;
        while (l->names_len + len + 1 > cap)
            cap *= 2;
        char *grown = realloc(l->names, cap);
        if (grown == NULL)
            return -1;
        l->names = grown;
        l->names_cap = cap;
    }
    if (l->count == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 128;
        entry_t *grown = realloc(l->entries, cap * sizeof(entry_t));
        if (grown == NULL)
            return -1;
        l->entries = grown;
        l->cap = cap;
    }
    entry_t *e = &l->entries[l->count++];
    memset(e, 0, sizeof(*e));
    e->name_at = l->names_len;
    e->name_len = len;
    memcpy(l->names + l->names_len, name, len + 1);
    l->names_len += len + 1;
    return 0;
}

/* As CPython's fill_time makes st_mtime and st_ctime: seconds + nanoseconds * 1e-9, in a double. */
static double stamp(time_t sec, long nsec) {
    return (double)sec + (double)nsec * 1e-9;
}

/* Our own allocation failed: MemoryError, as Python's own would be. An ENOMEM from the kernel or
   libc (fdopendir, getdents, fstatat) is an errno like any other, an OSError as os.scandir has it. */
#define OWN_NOMEM (-1)

/* Without the GIL: read every name, then lstat each. Returns 0, an errno or OWN_NOMEM; *kept is how
   many entries are valid (all of them, or those before a failed lstat). */
static int read_directory(int fd, listing_t *l, size_t *kept) {
    *kept = 0;
    int dup_fd = dup(fd);
    if (dup_fd < 0)
        return errno;
    DIR *dir = fdopendir(dup_fd);
    if (dir == NULL) {
        int err = errno;
        close(dup_fd);
        return err;
    }
    rewinddir(dir);
    for (;;) {
        errno = 0;
        struct dirent *d = readdir(dir);
        if (d == NULL) {
            int err = errno;
            closedir(dir);
            if (err)
                return err; /* as os.listdir: nothing kept */
            break;
        }
        const char *n = d->d_name;
        if (n[0] == '.' && (n[1] == '\0' || (n[1] == '.' && n[2] == '\0')))
            continue;
        if (add_name(l, n, strlen(n)) < 0) {
            closedir(dir);
            return OWN_NOMEM;
        }
    }
    size_t out = 0;
    for (size_t i = 0; i < l->count; i++) {
        entry_t e = l->entries[i];
        struct stat st;
        if (fstatat(fd, l->names + e.name_at, &st, AT_SYMLINK_NOFOLLOW) != 0) {
            if (errno == ENOENT)
                continue;
            *kept = out;
            return errno;
        }
        if (S_ISREG(st.st_mode))
            e.is_dir = 0;
        else if (S_ISDIR(st.st_mode))
            e.is_dir = 1;
        else
            continue;
        e.size = (int64_t)st.st_size;
        e.blocks = (int64_t)st.st_blocks;
        e.nlink = st.st_nlink;
        e.dev = st.st_dev;
        e.ino = st.st_ino;
        double m = stamp(st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
        double c = stamp(st.st_ctim.tv_sec, st.st_ctim.tv_nsec);
        /* Python's max(mtime, ctime) returns the first of equals; as values they are the same. */
        e.changed = c > m ? c : m;
        l->entries[out++] = e;
    }
    *kept = out;
    return 0;
}

static PyObject *list_dir(PyObject *self, PyObject *args) {
    int fd;
    double changed;
    if (!PyArg_ParseTuple(args, "id:list_dir", &fd, &changed))
        return NULL;
    listing_t l = {0};
    size_t kept = 0;
    int error;
    Py_BEGIN_ALLOW_THREADS
    error = read_directory(fd, &l, &kept);
    Py_END_ALLOW_THREADS
    if (error == OWN_NOMEM) {
        listing_free(&l);
        return PyErr_NoMemory();
    }

    size_t nfiles = 0, joined_len = 0;
    int wide = 0;
    for (size_t i = 0; i < kept; i++) {
        if (!l.entries[i].is_dir) {
            joined_len += l.entries[i].name_len + (nfiles ? 1 : 0);
            nfiles++;
            if (l.entries[i].blocks < 0 || l.entries[i].blocks > (int64_t)UINT32_MAX)
                wide = 1;
        }
    }
    char *joined_bytes = malloc(joined_len + 1);
    if (joined_bytes == NULL) {
        listing_free(&l);
        return PyErr_NoMemory();
    }
    PyObject *names = NULL;
    PyObject *sizes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(nfiles * sizeof(int64_t)));
    PyObject *blocks =
        PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(nfiles * (wide ? sizeof(int64_t) : sizeof(uint32_t))));
    PyObject *hard = PyList_New(0);
    PyObject *dirs = PyList_New(0);
    PyObject *result = NULL;
    if (sizes == NULL || blocks == NULL || hard == NULL || dirs == NULL)
        goto done;
    int64_t *size_out = (int64_t *)PyBytes_AS_STRING(sizes);
    char *block_out = PyBytes_AS_STRING(blocks);
    size_t f = 0, at = 0;
    for (size_t i = 0; i < kept; i++) {
        entry_t *e = &l.entries[i];
        if (e->is_dir) {
            PyObject *name = PyUnicode_DecodeFSDefaultAndSize(l.names + e->name_at, (Py_ssize_t)e->name_len);
            if (name == NULL)
                goto done;
            PyObject *item = Py_BuildValue("(NdKK)", name, e->changed, (unsigned long long)e->dev,
                                           (unsigned long long)e->ino);
            if (item == NULL || PyList_Append(dirs, item) < 0) {
                Py_XDECREF(item);
                goto done;
            }
            Py_DECREF(item);
            continue;
        }
        if (f)
            joined_bytes[at++] = '\0';
        memcpy(joined_bytes + at, l.names + e->name_at, e->name_len);
        at += e->name_len;
        size_out[f] = e->size;
        if (wide) {
            int64_t b = e->blocks;
            memcpy(block_out + f * sizeof(int64_t), &b, sizeof(b));
        } else {
            uint32_t b = (uint32_t)e->blocks;
            memcpy(block_out + f * sizeof(uint32_t), &b, sizeof(b));
        }
        if (e->nlink > 1) {
            PyObject *item = Py_BuildValue("(nKK)", (Py_ssize_t)f, (unsigned long long)e->dev,
                                           (unsigned long long)e->ino);
            if (item == NULL || PyList_Append(hard, item) < 0) {
                Py_XDECREF(item);
                goto done;
            }
            Py_DECREF(item);
        }
        if (e->changed > changed)
            changed = e->changed;
        f++;
    }
    /* One decode for all: a NUL ends any incomplete UTF-8 sequence before it, so each name decodes
       as it would alone (surrogateescape for bytes that are not UTF-8). */
    names = PyUnicode_DecodeFSDefaultAndSize(joined_bytes, (Py_ssize_t)at);
    if (names == NULL)
        goto done;
    result = Py_BuildValue("(OnOOOOdOi)", names, (Py_ssize_t)nfiles, sizes, blocks, wide ? Py_True : Py_False, hard,
                           changed, dirs, error);
done:
    free(joined_bytes);
    Py_XDECREF(names);
    Py_XDECREF(sizes);
    Py_XDECREF(blocks);
    Py_XDECREF(hard);
    Py_XDECREF(dirs);
    listing_free(&l);
    return result;
}

static PyMethodDef methods[] = {
    {"list_dir", list_dir, METH_VARARGS, "list_dir(fd, changed): one directory's files and subdirectories."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_listing", "The scan's inner loop in C (see exporter/index/scan.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__listing(void) {
    return PyModule_Create(&module);
}
