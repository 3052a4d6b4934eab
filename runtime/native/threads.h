/* A detached thread for the native pools (kernel.c's compute workers, reads.c's I/O threads). */
#ifndef FATE_THREADS_H
#define FATE_THREADS_H

#include <pthread.h>

/* Start fn on a thread nobody joins; 0, or pthread_create's error. */
static inline int start_detached(void *(*fn)(void *)) {
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&thread, &attr, fn, NULL);
    pthread_attr_destroy(&attr);
    return rc;
}

#endif
