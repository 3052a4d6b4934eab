/* Reads of expert files into slots on a small pool of I/O threads, so that whoever waits for one
 * does it without Python's lock and without handing work to a Python thread.
 *
 * A read is one file's [offset, offset + length) into `dest` (a slot: page-aligned, long enough),
 * with O_DIRECT where asked and the file system allows it (else an ordinary read whose pages are
 * dropped from the page cache after). Urgent reads (a layer stalled on them) go before queued ones,
 * and the others (prefetches) never hold more than half the threads, so that a stall finds a
 * thread free. A read still queued can be cancelled (a prefetch the router did not ask for).
 * No Python here: experts.c wraps a read as the Read type. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "reads.h"
#include "threads.h"

struct fate_read {
    struct fate_read *next;
    char *path;
    int64_t offset, length;
    uint8_t *dest;
    int direct, urgent;
    int state; /* 0 queued, 1 reading, 2 finished */
    int64_t got;
    int error;
    int direct_failed;
};

#define IO_THREADS 4
#define BACKGROUND_THREADS (IO_THREADS / 2) /* at most this many non-urgent reads at once */

static pthread_mutex_t io_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t io_work = PTHREAD_COND_INITIALIZER, io_finished = PTHREAD_COND_INITIALIZER;
/* one queue, urgent reads first and in order among themselves (urgent_tail: the last of them) */
static fate_read *queue_head = NULL, *queue_tail = NULL, *urgent_tail = NULL;
static int io_threads = 0, background_running = 0;

/* Read until `length` bytes or the end of the file; -1 with errno on an error. */
static int64_t read_fully(int fd, uint8_t *dest, int64_t length, int64_t offset) {
    int64_t done = 0;
    while (done < length) {
        ssize_t got = pread(fd, dest + done, (size_t)(length - done), (off_t)(offset + done));
        if (got < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (got == 0) break;
        done += got;
    }
    return done;
}

static void perform(fate_read *r) {
    r->got = -1;
    if (r->direct) {
#ifdef O_DIRECT
        int fd = open(r->path, O_RDONLY | O_DIRECT | O_CLOEXEC);
        if (fd >= 0) {
            int64_t got = read_fully(fd, r->dest, r->length, r->offset);
            int error = errno;
            close(fd);
            if (got >= 0) { r->got = got; r->error = 0; return; }
            if (error != EINVAL) { r->error = error; return; }
        } else if (errno != EINVAL) {
            r->error = errno;
            return;
        }
#endif
        r->direct_failed = 1; /* this file system or device wants another alignment: read it buffered */
    }
    int fd = open(r->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { r->error = errno; return; }
    int64_t got = read_fully(fd, r->dest, r->length, r->offset);
    r->error = got < 0 ? errno : 0;
    r->got = got;
#ifdef POSIX_FADV_DONTNEED
    posix_fadvise(fd, (off_t)r->offset, (off_t)r->length, POSIX_FADV_DONTNEED);
#endif
    close(fd);
}

/* Take `r` off the queue, `before` being the read queued just ahead of it (NULL: it is the head).
 * Under io_lock. */
static void unlink_queued(fate_read *r, fate_read *before) {
    if (before) before->next = r->next; else queue_head = r->next;
    if (queue_tail == r) queue_tail = before;
    if (urgent_tail == r) urgent_tail = before;
}

/* The read a free thread may take now: the first urgent one, else the first queued while fewer than
 * BACKGROUND_THREADS background reads run; unlinked from the queue. Under io_lock. */
static fate_read *take_next(void) {
    fate_read *r = queue_head;
    if (!r || (!r->urgent && background_running >= BACKGROUND_THREADS)) return NULL;
    unlink_queued(r, NULL);
    return r;
}

static void *io_worker(void *arg) {
    (void)arg;
    pthread_mutex_lock(&io_lock);
    for (;;) {
        fate_read *r;
        while (!(r = take_next())) pthread_cond_wait(&io_work, &io_lock);
        r->state = 1;
        if (!r->urgent) background_running++;
        pthread_mutex_unlock(&io_lock);
        perform(r);
        pthread_mutex_lock(&io_lock);
        if (!r->urgent) {
            background_running--;
            pthread_cond_signal(&io_work); /* a queued background read may run now */
        }
        r->state = 2;
        pthread_cond_broadcast(&io_finished);
    }
    return NULL;
}

fate_read *fate_read_start(const char *path, int64_t offset, int64_t length, uint8_t *dest, int direct, int urgent) {
    fate_read *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->path = strdup(path);
    if (!r->path) { free(r); return NULL; }
    r->offset = offset; r->length = length; r->dest = dest; r->direct = direct; r->urgent = urgent;
    pthread_mutex_lock(&io_lock);
    while (io_threads < IO_THREADS && start_detached(io_worker) == 0) io_threads++;
    if (io_threads == 0) { /* no thread could be started: read here, now */
        pthread_mutex_unlock(&io_lock);
        perform(r);
        r->state = 2;
        return r;
    }
    if (urgent) {
        fate_read **at = urgent_tail ? &urgent_tail->next : &queue_head;
        r->next = *at;
        *at = r;
        urgent_tail = r;
        if (!r->next) queue_tail = r;
    } else {
        if (queue_tail) queue_tail->next = r; else queue_head = r;
        queue_tail = r;
    }
    pthread_cond_signal(&io_work);
    pthread_mutex_unlock(&io_lock);
    return r;
}

int fate_read_cancel(fate_read *r) {
    pthread_mutex_lock(&io_lock);
    int cancelled = r->state == 0;
    if (cancelled) {
        fate_read *before = NULL;
        for (fate_read *q = queue_head; q != r; q = q->next) before = q;
        unlink_queued(r, before);
        r->state = 2;
        r->got = -1;
        r->error = ECANCELED;
        pthread_cond_broadcast(&io_finished);
    }
    pthread_mutex_unlock(&io_lock);
    return cancelled;
}

int fate_read_done(fate_read *r) {
    pthread_mutex_lock(&io_lock);
    int done = r->state == 2;
    pthread_mutex_unlock(&io_lock);
    return done;
}

void fate_read_wait(fate_read *r) {
    pthread_mutex_lock(&io_lock);
    while (r->state != 2) pthread_cond_wait(&io_finished, &io_lock);
    pthread_mutex_unlock(&io_lock);
}

int64_t fate_read_result(const fate_read *r, int *error, int *direct_failed) {
    *error = r->error;
    *direct_failed = r->direct_failed;
    return r->got;
}

void fate_read_free(fate_read *r) {
    if (!r) return;
    fate_read_wait(r); /* never free what an I/O thread still writes */
    free(r->path);
    free(r);
}
