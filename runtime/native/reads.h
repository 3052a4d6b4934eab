/* Reads of expert files into slots on native I/O threads (reads.c). */
#ifndef FATE_READS_H
#define FATE_READS_H

#include <stdint.h>

typedef struct fate_read fate_read;

/* Queue a read of [offset, offset + length) of `path` into `dest`; NULL when memory ran out. */
fate_read *fate_read_start(const char *path, int64_t offset, int64_t length, uint8_t *dest, int direct, int urgent);
/* Take a read that no thread has begun off the queue (it then ends with ECANCELED): 1, else 0. */
int fate_read_cancel(fate_read *r);
int fate_read_done(fate_read *r);
void fate_read_wait(fate_read *r);
/* Bytes read (fewer at the end of the file), or -1 with *error set; *direct_failed when O_DIRECT was refused. */
int64_t fate_read_result(const fate_read *r, int *error, int *direct_failed);
void fate_read_free(fate_read *r); /* waits for the read first */

#endif
