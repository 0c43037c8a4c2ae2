/* Reads that fail as on a sick network mount, for the jobs a test starts (LD_PRELOAD).
 *
 * A file whose name (the last part of its path) is listed in FAULTY_READS opens fine, but
 * every read of it fails with FAULTY_READS_ERRNO (default EIO), as when a Lustre or NFS
 * client loses its server or a disk returns a bad sector:
 *
 *   FAULTY_READS="a.jpg:2,b.png"   a.jpg: the first 2 opens in each process read with errors,
 *                                   later ones read fine; b.png: every open reads with errors
 *   FAULTY_READS_WHILE=<path>       faults only while this file exists (the mount "recovers"
 *                                   when the test removes it)
 *   FAULTY_READS_LOG=<path>         one line "<name>\n" appended per failed read
 *
 * The libc calls a Python process reads files through are wrapped: open, open64, openat,
 * openat64 (to note the descriptor), read, pread, pread64, readv (to fail), close.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_NAMES 64
#define MAX_FDS 65536

static char names[MAX_NAMES][256];
static int limited[MAX_NAMES];
static int remaining[MAX_NAMES];
static int n_names;
static unsigned char faulty[MAX_FDS];
static int fault_errno = EIO;
static const char *gate;
static const char *log_path;

static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);
static ssize_t (*real_read)(int, void *, size_t);
static ssize_t (*real_pread)(int, void *, size_t, off_t);
static ssize_t (*real_pread64)(int, void *, size_t, off_t);
static ssize_t (*real_readv)(int, const struct iovec *, int);
static int (*real_close)(int);

__attribute__((constructor)) static void setup(void) {
    real_open = dlsym(RTLD_NEXT, "open");
    real_open64 = dlsym(RTLD_NEXT, "open64");
    real_openat = dlsym(RTLD_NEXT, "openat");
    real_openat64 = dlsym(RTLD_NEXT, "openat64");
    real_read = dlsym(RTLD_NEXT, "read");
    real_pread = dlsym(RTLD_NEXT, "pread");
    real_pread64 = dlsym(RTLD_NEXT, "pread64");
    real_readv = dlsym(RTLD_NEXT, "readv");
    real_close = dlsym(RTLD_NEXT, "close");
    const char *value = getenv("FAULTY_READS_ERRNO");
    if (value && *value) fault_errno = atoi(value);
    gate = getenv("FAULTY_READS_WHILE");
    log_path = getenv("FAULTY_READS_LOG");
    const char *list = getenv("FAULTY_READS");
    if (!list) return;
    char buffer[8192];
    strncpy(buffer, list, sizeof buffer - 1);
    buffer[sizeof buffer - 1] = 0;
    for (char *save = NULL, *item = strtok_r(buffer, ",", &save); item && n_names < MAX_NAMES;
         item = strtok_r(NULL, ",", &save)) {
        char *colon = strrchr(item, ':');
        if (colon) {
            *colon = 0;
            limited[n_names] = 1;
            remaining[n_names] = atoi(colon + 1);
        }
        strncpy(names[n_names], item, sizeof names[0] - 1);
        n_names++;
    }
}

static int match(const char *path) {
    if (!path || !n_names) return -1;
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    for (int i = 0; i < n_names; i++)
        if (strcmp(base, names[i]) == 0) return i;
    return -1;
}

static int gate_open(void) {
    /* A raw syscall: no wrapped function runs inside a wrapper. */
    return !gate || syscall(SYS_faccessat, AT_FDCWD, gate, F_OK, 0) == 0;
}

static int note(int fd, const char *path) {
    if (fd < 0 || fd >= MAX_FDS) return fd;
    faulty[fd] = 0;
    int i = match(path);
    if (i < 0 || !gate_open()) return fd;
    if (limited[i] && __atomic_sub_fetch(&remaining[i], 1, __ATOMIC_SEQ_CST) < 0) return fd;
    faulty[fd] = (unsigned char)(i + 1);
    return fd;
}

static ssize_t fail(int fd) {
    if (log_path) {
        int out = (int)syscall(SYS_openat, AT_FDCWD, log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC,
                               0644);
        if (out >= 0) {
            const char *name = names[faulty[fd] - 1];
            char line[300];
            size_t length = strlen(name);
            memcpy(line, name, length);
            line[length] = '\n';
            syscall(SYS_write, out, line, length + 1);
            syscall(SYS_close, out);
        }
    }
    errno = fault_errno;
    return -1;
}

static int is_faulty(int fd) { return fd >= 0 && fd < MAX_FDS && faulty[fd]; }

static mode_t mode_of(int flags, va_list args) {
    return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? (mode_t)va_arg(args, int) : 0;
}

int open(const char *path, int flags, ...) {
    va_list args;
    va_start(args, flags);
    mode_t mode = mode_of(flags, args);
    va_end(args);
    return note(real_open(path, flags, mode), path);
}

int open64(const char *path, int flags, ...) {
    va_list args;
    va_start(args, flags);
    mode_t mode = mode_of(flags, args);
    va_end(args);
    return note(real_open64(path, flags, mode), path);
}

int openat(int dir, const char *path, int flags, ...) {
    va_list args;
    va_start(args, flags);
    mode_t mode = mode_of(flags, args);
    va_end(args);
    return note(real_openat(dir, path, flags, mode), path);
}

int openat64(int dir, const char *path, int flags, ...) {
    va_list args;
    va_start(args, flags);
    mode_t mode = mode_of(flags, args);
    va_end(args);
    return note(real_openat64(dir, path, flags, mode), path);
}

ssize_t read(int fd, void *buffer, size_t count) {
    return is_faulty(fd) ? fail(fd) : real_read(fd, buffer, count);
}

ssize_t pread(int fd, void *buffer, size_t count, off_t offset) {
    return is_faulty(fd) ? fail(fd) : real_pread(fd, buffer, count, offset);
}

ssize_t pread64(int fd, void *buffer, size_t count, off_t offset) {
    return is_faulty(fd) ? fail(fd) : real_pread64(fd, buffer, count, offset);
}

ssize_t readv(int fd, const struct iovec *vector, int count) {
    return is_faulty(fd) ? fail(fd) : real_readv(fd, vector, count);
}

int close(int fd) {
    if (fd >= 0 && fd < MAX_FDS) faulty[fd] = 0;
    return real_close(fd);
}
