/* fate.runtime._experts: the Python face of the expert kernel (kernel.c).
 *
 * run_experts() computes every routed expert of one layer in one call, with the GIL released,
 * from the bytes of their files in their slots:
 *
 *     y[dest[a]] = down(act(gate(x[rows[a]]), up(x[rows[a]])))   for each assignment a
 *
 * The kernel reads what it is given; everything it relies on is checked here first: the layout's
 * numbers, every tensor of every expert inside its buffer, the sizes of x and y, starts running
 * from 0 to the number of assignments without decreasing, every row and destination in range.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernel.h"
#include "reads.h"

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *what) {
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) != 0) {
        PyErr_Format(PyExc_TypeError, "%s: expected a contiguous%s buffer", what, writable ? " writable" : "");
        return -1;
    }
    return 0;
}

/* What a call took: expert buffers (the first `got` of `ev`), their bases, the sequence, and views. */
static void release(Py_buffer *ev, Py_ssize_t got, const uint8_t **bases, PyObject *seq, Py_buffer *const *views,
                    size_t count) {
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&ev[i]);
    free(ev);
    free((void *)bases);
    Py_XDECREF(seq);
    for (size_t i = 0; i < count; i++)
        if (views[i]->obj) PyBuffer_Release(views[i]);
}

/* An expert layout vector (int64[19], fate.runtime.native.layout_vector) into `l`, its numbers checked. */
static int parse_layout(const Py_buffer *lv, double limit, double alpha, fate_layout *l) {
    if (lv->len != L_SIZE * 8) { PyErr_SetString(PyExc_ValueError, "layout: expected 19 int64"); return -1; }
    const int64_t *v = lv->buf;
    memset(l, 0, sizeof *l);
    l->hidden = v[L_HIDDEN]; l->inter = v[L_INTER];
    l->bits = (int)v[L_BITS]; l->block = v[L_BLOCK]; l->int8 = v[L_ACCURACY] == 4;
    l->activation = (int)v[L_ACTIVATION]; l->has_bias = v[L_HAS_BIAS] != 0;
    l->limit = (float)limit; l->alpha = (float)alpha;
    memcpy(l->offsets, v + L_TENSORS, sizeof l->offsets);
    if (v[L_BITS] != l->bits || v[L_ACTIVATION] != l->activation || fate_layout_check(l) != 0) {
        PyErr_SetString(PyExc_ValueError, "layout: unsupported numbers");
        return -1;
    }
    return 0;
}

/* Every buffer of `seq` (views into `views`, bases into `bases`), each at least `need` bytes; returns
 * how many views were taken (all on success), or -1 - taken with an exception set. */
static Py_ssize_t get_experts(PyObject *seq, Py_ssize_t count, int64_t need, Py_buffer *views, const uint8_t **bases) {
    for (Py_ssize_t i = 0; i < count; i++) {
        if (get_buffer(PySequence_Fast_GET_ITEM(seq, i), &views[i], 0, "experts[i]")) return -1 - i;
        bases[i] = views[i].buf;
        if (views[i].len < need) {
            PyErr_Format(PyExc_ValueError, "expert buffer %zd has %zd bytes; its layout needs %lld", i, views[i].len,
                         (long long)need);
            return -1 - (i + 1);
        }
    }
    return count;
}

static const char run_doc[] =
    "run_experts(layout, experts, x, starts, rows, dest, y, threads, limit, alpha)\n"
    "Compute y[dest[a]] = expert(x[rows[a]]) for the assignments a in starts[e]..starts[e+1] of\n"
    "expert e, whose file bytes are the buffer experts[e]. layout: int64[19]; x: float32 [S, H];\n"
    "starts, rows, dest: int32; y: float32 [R, H]. Every offset and index is checked first.";

static PyObject *run_experts(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *layout_obj, *experts_obj, *x_obj, *starts_obj, *rows_obj, *dest_obj, *y_obj;
    int threads;
    double limit, alpha;
    if (!PyArg_ParseTuple(args, "OOOOOOOidd", &layout_obj, &experts_obj, &x_obj, &starts_obj, &rows_obj, &dest_obj,
                          &y_obj, &threads, &limit, &alpha))
        return NULL;
    Py_buffer lv = {0}, xv = {0}, sv = {0}, rv = {0}, dv = {0}, yv = {0};
    Py_buffer *ev = NULL;
    const uint8_t **bases = NULL;
    Py_ssize_t n_experts = 0, got = 0;
    PyObject *result = NULL, *seq = NULL;
    fate_layout l;
    memset(&l, 0, sizeof l);
    if (get_buffer(layout_obj, &lv, 0, "layout") || get_buffer(x_obj, &xv, 0, "x") ||
        get_buffer(starts_obj, &sv, 0, "starts") || get_buffer(rows_obj, &rv, 0, "rows") ||
        get_buffer(dest_obj, &dv, 0, "dest") || get_buffer(y_obj, &yv, 1, "y"))
        goto done;
    if (parse_layout(&lv, limit, alpha, &l) != 0) goto done;
    if (xv.len % (l.hidden * 4) || yv.len % (l.hidden * 4) || sv.len % 4 || rv.len != dv.len || rv.len % 4) {
        PyErr_SetString(PyExc_ValueError, "x, y, starts, rows or dest has the wrong size");
        goto done;
    }
    int64_t tokens = xv.len / (l.hidden * 4), out_rows = yv.len / (l.hidden * 4), assignments = rv.len / 4;
    seq = PySequence_Fast(experts_obj, "experts: expected a sequence of buffers");
    if (!seq) goto done;
    n_experts = PySequence_Fast_GET_SIZE(seq);
    if (sv.len / 4 != n_experts + 1) { PyErr_SetString(PyExc_ValueError, "starts: expected len(experts) + 1"); goto done; }
    ev = calloc((size_t)n_experts + 1, sizeof(Py_buffer));
    bases = calloc((size_t)n_experts + 1, sizeof(uint8_t *));
    if (!ev || !bases) { PyErr_NoMemory(); goto done; }
    /* every tensor of every expert inside its buffer */
    int64_t need = fate_layout_bytes(&l);
    if (need < 0) { PyErr_SetString(PyExc_ValueError, "layout: bad offset"); goto done; }
    got = get_experts(seq, n_experts, need, ev, bases);
    if (got < 0) { got = -1 - got; goto done; }
    const int32_t *starts = sv.buf, *rows = rv.buf, *dest = dv.buf;
    if (starts[0] != 0 || starts[n_experts] != assignments) {
        PyErr_SetString(PyExc_ValueError, "starts must run from 0 to len(rows)");
        goto done;
    }
    for (Py_ssize_t e = 0; e < n_experts; e++)
        if (starts[e + 1] < starts[e]) { PyErr_SetString(PyExc_ValueError, "starts must not decrease"); goto done; }
    for (int64_t a = 0; a < assignments; a++)
        if (rows[a] < 0 || rows[a] >= tokens || dest[a] < 0 || dest[a] >= out_rows) {
            PyErr_SetString(PyExc_IndexError, "rows or dest out of range");
            goto done;
        }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fate_run_experts(&l, bases, n_experts, xv.buf, tokens, starts, rows, dest, yv.buf, threads);
    Py_END_ALLOW_THREADS
    if (rc != 0) { PyErr_NoMemory(); goto done; }
    Py_INCREF(Py_None);
    result = Py_None;
done:;
    Py_buffer *views[] = {&lv, &xv, &sv, &rv, &dv, &yv};
    release(ev, got, bases, seq, views, sizeof views / sizeof *views);
    return result;
}

/* The arrays and numbers run_step and run_prefill share, taken from their arguments and checked
 * against the step (its vector, its numbers, the graph buffer holding every tensor it reads). */
typedef struct {
    Py_buffer step, graph, x, key, value, cos, sin, residual, router_input, ids, weights, next, next_norm;
    fate_step s;
} step_call;

/* The step's vector and numbers (c->step, c->graph taken): checked against the graph buffer holding every
 * tensor it reads. */
static int take_step(const double floats[6], step_call *c) {
    if (c->step.len != S_SIZE * 8) { PyErr_Format(PyExc_ValueError, "step: expected %d int64", S_SIZE); return -1; }
    memcpy(c->s.v, c->step.buf, sizeof c->s.v);
    c->s.eps = (float)floats[0]; c->s.scale = (float)floats[1]; c->s.shared_scale = (float)floats[2];
    c->s.routed_scaling = (float)floats[3]; c->s.clip = (float)floats[4]; c->s.topk_eps = (float)floats[5];
    int64_t need = fate_step_bytes(&c->s);
    if (need < 0) { PyErr_SetString(PyExc_ValueError, "step: unsupported numbers or a bad offset"); return -1; }
    if (c->graph.len < need) {
        PyErr_Format(PyExc_ValueError, "graph buffer has %zd bytes; its step needs %lld", c->graph.len,
                     (long long)need);
        return -1;
    }
    return 0;
}

static int take_step_call(PyObject *const objs[13], const double floats[6], step_call *c) {
    static const char *const names[13] = {"step", "graph", "x", "key", "value", "cos", "sin", "residual",
                                          "router_input", "ids", "weights", "next_logits", "next_logits_norm"};
    static const int writable[13] = {0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1};
    Py_buffer *views[13] = {&c->step, &c->graph, &c->x, &c->key, &c->value, &c->cos, &c->sin, &c->residual,
                            &c->router_input, &c->ids, &c->weights, &c->next, &c->next_norm};
    for (int i = 0; i < 13; i++)
        if (!(i >= 11 && objs[i] == Py_None) && get_buffer(objs[i], views[i], writable[i], names[i])) return -1;
    return take_step(floats, c);
}

static void release_step_call(step_call *c) {
    Py_buffer *views[] = {&c->step, &c->graph, &c->x, &c->key, &c->value, &c->cos, &c->sin, &c->residual,
                          &c->router_input, &c->ids, &c->weights, &c->next, &c->next_norm};
    release(NULL, 0, NULL, NULL, views, sizeof views / sizeof *views);
}

/* A layer's routed experts as run_step and add_routed take them, (layout, limit, alpha, pool, where): the
 * layout parsed into `l`, and `bases` (allocated: count + 1) by expert id, the expert's bytes in the pool or
 * NULL where where[e] is -1. Checked: the layout's hidden size, where's length, each offset inside the pool.
 * where[] is read once, here: the kernel uses these bases whatever the caller's table says meanwhile. */
static int take_routed(PyObject *routed_obj, int64_t hidden, int64_t count, const char *who, Py_buffer *lv,
                       Py_buffer *pv, Py_buffer *ov, fate_layout *l, const uint8_t ***bases) {
    PyObject *layout_obj, *pool_obj, *where_obj;
    double limit, alpha;
    if (!PyArg_ParseTuple(routed_obj, "OddOO", &layout_obj, &limit, &alpha, &pool_obj, &where_obj) ||
        get_buffer(layout_obj, lv, 0, "layout") || parse_layout(lv, limit, alpha, l) ||
        get_buffer(pool_obj, pv, 0, "pool") || get_buffer(where_obj, ov, 0, "where"))
        return -1;
    int64_t need = fate_layout_bytes(l);
    if (need < 0 || l->hidden != hidden || ov->len != count * 8) {
        PyErr_Format(PyExc_ValueError, "%s: the routed experts do not fit the step", who);
        return -1;
    }
    *bases = calloc((size_t)count + 1, sizeof(uint8_t *));
    if (!*bases) { PyErr_NoMemory(); return -1; }
    const int64_t *where = ov->buf;
    for (int64_t e = 0; e < count; e++) {
        int64_t at = where[e];
        if (at < -1 || (at >= 0 && (at > pv->len || need > pv->len - at))) {
            PyErr_Format(PyExc_ValueError, "%s: expert %lld lies outside its pool", who, (long long)e);
            return -1;
        }
        (*bases)[e] = at >= 0 ? (const uint8_t *)pv->buf + at : NULL;
    }
    return 0;
}

/* IndexError (naming `who`) where an expert id is outside [0, experts): the kernel indexes by them. */
static int ids_out_of_range(const int64_t *ids, int64_t count, int64_t experts, const char *who) {
    for (int64_t j = 0; j < count; j++)
        if (ids[j] < 0 || ids[j] >= experts) {
            PyErr_Format(PyExc_IndexError, "%s: an id is out of range", who);
            return 1;
        }
    return 0;
}

static const char step_doc[] =
    "run_step(step, floats, graph, x, key, value, pos, cos, sin, residual, router_input, ids, weights,\n"
    "         next_logits, next_logits_norm, threads, routed)\n"
    "One decoder layer's decode step from the bytes of its graph file (kernel.h: fate_run_step).\n"
    "step: int64 vector; floats: (eps, scale, shared_scale, routed_scaling, clip, topk_eps); key, value\n"
    "float32 "
    "[1, KV, capacity, D], written at pos; next_logits, next_logits_norm: float32 [E'] or None;\n"
    "routed: None, or (layout, limit, alpha, pool, where) to run the chosen experts too: where[e], int64\n"
    "per expert id, is the offset of expert e's file bytes in the buffer pool, or -1 (not there). Returns\n"
    "True when it ran them (every chosen one was there), else False: the residual then holds no routed\n"
    "output and the caller runs them. Every size, offset and index is checked first.";

static const char route_doc[] =
    "route_step(step, floats, graph, x, key, value, pos, cos, sin, residual, router_input, ids, weights,\n"
    "           next_logits, next_logits_norm, threads)\n"
    "run_step's first part (kernel.h: fate_step_route): up to the routing and the next layer's prediction,\n"
    "the stream after attention left in residual; finish_step does the rest. Returns None.";

/* run_step (routed: its last argument) and route_step (routing only: no routed argument) */
static PyObject *step_call_run(PyObject *args, int whole) {
    PyObject *o[13], *routed_obj = Py_None;
    double f[6];
    long long pos;
    int threads;
    if (whole ? !PyArg_ParseTuple(args, "O(dddddd)OOOOLOOOOOOOOiO", &o[0], &f[0], &f[1], &f[2], &f[3], &f[4], &f[5],
                                  &o[1], &o[2], &o[3], &o[4], &pos, &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &o[11],
                                  &o[12], &threads, &routed_obj)
              : !PyArg_ParseTuple(args, "O(dddddd)OOOOLOOOOOOOOi", &o[0], &f[0], &f[1], &f[2], &f[3], &f[4], &f[5],
                                  &o[1], &o[2], &o[3], &o[4], &pos, &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &o[11],
                                  &o[12], &threads))
        return NULL;
    const char *who = whole ? "run_step" : "route_step";
    step_call c;
    memset(&c, 0, sizeof c);
    Py_buffer lv = {0}, pv = {0}, ov = {0};
    PyObject *result = NULL;
    const uint8_t **bases = NULL;
    fate_layout routed;
    if (take_step_call(o, f, &c)) goto done;
    const int64_t *v = c.s.v;
    int64_t h = v[S_HIDDEN], per_position = v[S_KV_HEADS] * v[S_HEAD_DIM] * 4;
    if (c.x.len != h * 4 || c.residual.len != h * 4 || c.router_input.len != h * 4 || c.ids.len != v[S_TOP_K] * 8 ||
        c.weights.len != v[S_TOP_K] * 4 || c.cos.len < v[S_ROT_HALF] * 4 || c.sin.len < v[S_ROT_HALF] * 4 ||
        c.key.len != c.value.len || c.key.len % per_position ||
        (c.next.obj && c.next.len != v[S_NEXT_EXPERTS] * 4) ||
        (c.next_norm.obj && c.next_norm.len != v[S_NEXT_EXPERTS] * 4) ||
        ((c.next.obj || c.next_norm.obj) && v[S_NEXT_EXPERTS] == 0)) {
        PyErr_Format(PyExc_ValueError, "%s: an array has the wrong size", who);
        goto done;
    }
    int64_t capacity = c.key.len / per_position;
    if (pos < 0 || pos >= capacity) { PyErr_Format(PyExc_IndexError, "%s: pos is outside the caches", who); goto done; }
    if (routed_obj != Py_None && take_routed(routed_obj, h, v[S_EXPERTS], who, &lv, &pv, &ov, &routed, &bases))
        goto done;
    int rc;
    float *next = c.next.obj ? c.next.buf : NULL, *next_norm = c.next_norm.obj ? c.next_norm.buf : NULL;
    Py_BEGIN_ALLOW_THREADS
    if (whole)
        rc = fate_run_step(&c.s, c.graph.buf, c.x.buf, c.key.buf, c.value.buf, capacity, pos, c.cos.buf, c.sin.buf,
                           c.residual.buf, c.router_input.buf, c.ids.buf, c.weights.buf, next, next_norm,
                           bases ? &routed : NULL, bases, threads);
    else
        rc = fate_step_route(&c.s, c.graph.buf, c.x.buf, c.key.buf, c.value.buf, capacity, pos, c.cos.buf, c.sin.buf,
                             c.residual.buf, c.router_input.buf, c.ids.buf, c.weights.buf, next, next_norm, threads);
    Py_END_ALLOW_THREADS
    if (rc < 0) { PyErr_NoMemory(); goto done; }
    if (whole) result = PyBool_FromLong(bases != NULL && rc == 0);
    else { Py_INCREF(Py_None); result = Py_None; }
done:;
    Py_buffer *views[] = {&lv, &pv, &ov};
    release(NULL, 0, bases, NULL, views, sizeof views / sizeof *views);
    release_step_call(&c);
    return result;
}

static PyObject *run_step(PyObject *self, PyObject *args) {
    (void)self;
    return step_call_run(args, 1);
}

static PyObject *route_step(PyObject *self, PyObject *args) {
    (void)self;
    return step_call_run(args, 0);
}

static const char finish_doc[] =
    "finish_step(step, floats, graph, residual, router_input, ids, weights, threads, routed)\n"
    "run_step's second part (kernel.h: fate_step_finish), after route_step on the same arrays: the shared\n"
    "expert added to residual and, with routed, the chosen experts; returns as run_step does. The ids are\n"
    "checked against the layer's experts.";

static PyObject *finish_step(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o[6], *routed_obj;
    double f[6];
    int threads;
    if (!PyArg_ParseTuple(args, "O(dddddd)OOOOOiO", &o[0], &f[0], &f[1], &f[2], &f[3], &f[4], &f[5], &o[1], &o[2],
                          &o[3], &o[4], &o[5], &threads, &routed_obj))
        return NULL;
    static const char *const names[6] = {"step", "graph", "residual", "router_input", "ids", "weights"};
    static const int writable[6] = {0, 0, 1, 0, 0, 0};
    step_call c;
    memset(&c, 0, sizeof c);
    Py_buffer *views[6] = {&c.step, &c.graph, &c.residual, &c.router_input, &c.ids, &c.weights};
    Py_buffer lv = {0}, pv = {0}, ov = {0};
    PyObject *result = NULL;
    const uint8_t **bases = NULL;
    fate_layout routed;
    for (int i = 0; i < 6; i++)
        if (get_buffer(o[i], views[i], writable[i], names[i])) goto done;
    if (take_step(f, &c)) goto done;
    const int64_t *v = c.s.v;
    int64_t h = v[S_HIDDEN], top_k = v[S_TOP_K];
    if (c.residual.len != h * 4 || c.router_input.len != h * 4 || c.ids.len != top_k * 8 || c.weights.len != top_k * 4) {
        PyErr_SetString(PyExc_ValueError, "finish_step: an array has the wrong size");
        goto done;
    }
    const int64_t *ids = c.ids.buf;
    if (ids_out_of_range(ids, top_k, v[S_EXPERTS], "finish_step")) goto done;
    if (routed_obj != Py_None && take_routed(routed_obj, h, v[S_EXPERTS], "finish_step", &lv, &pv, &ov, &routed, &bases))
        goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fate_step_finish(&c.s, c.graph.buf, c.residual.buf, c.router_input.buf, ids, c.weights.buf,
                          bases ? &routed : NULL, bases, threads);
    Py_END_ALLOW_THREADS
    if (rc < 0) { PyErr_NoMemory(); goto done; }
    result = PyBool_FromLong(bases != NULL && rc == 0);
done:;
    Py_buffer *held[] = {&lv, &pv, &ov};
    release(NULL, 0, bases, NULL, held, sizeof held / sizeof *held);
    release_step_call(&c);
    return result;
}

static const char add_routed_doc[] =
    "add_routed(routed, ids, weights, router_input, residual, threads)\n"
    "The routed experts of one token added to its residual in the router's order, as run_step adds them (the\n"
    "same bits; kernel.h: fate_add_routed): routed is run_step's (layout, limit, alpha, pool, where); ids int64\n"
    "and weights float32 [top_k]; router_input and residual float32 [H], residual written. True when it added\n"
    "them; False, the residual untouched, when a chosen expert is not in the pool. Every size and index is\n"
    "checked first.";

static PyObject *add_routed(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *routed_obj, *ids_obj, *weights_obj, *x_obj, *residual_obj;
    int threads;
    if (!PyArg_ParseTuple(args, "OOOOOi", &routed_obj, &ids_obj, &weights_obj, &x_obj, &residual_obj, &threads))
        return NULL;
    Py_buffer lv = {0}, pv = {0}, ov = {0}, iv = {0}, wv = {0}, xv = {0}, rv = {0};
    const uint8_t **bases = NULL;
    fate_layout routed;
    PyObject *result = NULL;
    if (get_buffer(ids_obj, &iv, 0, "ids") || get_buffer(weights_obj, &wv, 0, "weights") ||
        get_buffer(x_obj, &xv, 0, "router_input") || get_buffer(residual_obj, &rv, 1, "residual"))
        goto done;
    int64_t top_k = iv.len / 8, h = xv.len / 4;
    if (top_k <= 0 || iv.len != top_k * 8 || wv.len != top_k * 4 || h <= 0 || xv.len != h * 4 || rv.len != xv.len) {
        PyErr_SetString(PyExc_ValueError, "add_routed: an array has the wrong size");
        goto done;
    }
    PyObject *where_obj = PyTuple_Check(routed_obj) && PyTuple_GET_SIZE(routed_obj) == 5 ? PyTuple_GET_ITEM(routed_obj, 4)
                                                                                            : NULL;
    Py_ssize_t where_len = where_obj ? PyObject_Length(where_obj) : -1;
    if (where_len < 0) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "add_routed: routed must be (layout, limit, alpha, pool, where)");
        goto done;
    }
    if (take_routed(routed_obj, h, where_len, "add_routed", &lv, &pv, &ov, &routed, &bases)) goto done;
    const int64_t *ids = iv.buf;
    if (ids_out_of_range(ids, top_k, where_len, "add_routed")) goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fate_add_routed(&routed, bases, ids, wv.buf, top_k, xv.buf, rv.buf, threads);
    Py_END_ALLOW_THREADS
    if (rc < 0) { PyErr_NoMemory(); goto done; }
    result = PyBool_FromLong(rc == 0);
done:;
    Py_buffer *views[] = {&lv, &pv, &ov, &iv, &wv, &xv, &rv};
    release(NULL, 0, bases, NULL, views, sizeof views / sizeof *views);
    return result;
}

static const char prefill_doc[] =
    "run_prefill(step, floats, graph, x, key, value, pos0, cos, sin, residual, router_input, ids, weights,\n"
    "            next_logits, next_logits_norm, threads)\n"
    "The decode step over T consecutive tokens at positions pos0.. (kernel.h: fate_run_prefill): x, residual,\n"
    "router_input float32 [T, H]; ids int64 and weights float32 [T, top_k]; next_logits(_norm) float32 [T, E']\n"
    "or None; cos, sin: the position tables [>= pos0 + T, rotary half]. Every size checked first.";

static PyObject *run_prefill(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o[13];
    double f[6];
    long long pos0;
    int threads;
    if (!PyArg_ParseTuple(args, "O(dddddd)OOOOLOOOOOOOOi", &o[0], &f[0], &f[1], &f[2], &f[3], &f[4], &f[5], &o[1],
                          &o[2], &o[3], &o[4], &pos0, &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &o[11], &o[12],
                          &threads))
        return NULL;
    step_call c;
    memset(&c, 0, sizeof c);
    PyObject *result = NULL;
    if (take_step_call(o, f, &c)) goto done;
    const int64_t *v = c.s.v;
    int64_t h = v[S_HIDDEN], per_position = v[S_KV_HEADS] * v[S_HEAD_DIM] * 4, k = v[S_TOP_K];
    int64_t tokens = c.x.len / (h * 4), next = v[S_NEXT_EXPERTS], half = v[S_ROT_HALF];
    if (tokens <= 0 || c.x.len != tokens * h * 4 || c.residual.len != c.x.len || c.router_input.len != c.x.len ||
        c.ids.len != tokens * k * 8 || c.weights.len != tokens * k * 4 || c.key.len != c.value.len ||
        c.key.len % per_position || c.cos.len != c.sin.len || (c.next.obj && c.next.len != tokens * next * 4) ||
        (c.next_norm.obj && c.next_norm.len != tokens * next * 4) || ((c.next.obj || c.next_norm.obj) && next == 0)) {
        PyErr_SetString(PyExc_ValueError, "run_prefill: an array has the wrong size");
        goto done;
    }
    int64_t capacity = c.key.len / per_position;
    if (pos0 < 0 || pos0 + tokens > capacity || (half > 0 && c.cos.len < (pos0 + tokens) * half * 4)) {
        PyErr_SetString(PyExc_IndexError, "run_prefill: the positions are outside the caches or the tables");
        goto done;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fate_run_prefill(&c.s, c.graph.buf, c.x.buf, tokens, c.key.buf, c.value.buf, capacity, pos0, c.cos.buf,
                          c.sin.buf, c.residual.buf, c.router_input.buf, c.ids.buf, c.weights.buf,
                          c.next.obj ? c.next.buf : NULL, c.next_norm.obj ? c.next_norm.buf : NULL, threads);
    Py_END_ALLOW_THREADS
    if (rc < 0) { PyErr_NoMemory(); goto done; }
    result = Py_NewRef(Py_None);
done:
    release_step_call(&c);
    return result;
}

static const char head_doc[] =
    "run_head(head, floats, graph, x, logits, threads)\n"
    "The LM head's decode step from the bytes of the head graph (kernel.h: fate_run_head). head: int64\n"
    "vector; floats: (eps, logits_scaling); x: float32 [H]; logits: float32 [V]. Everything checked first.";

static PyObject *run_head(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *head_obj, *graph_obj, *x_obj, *logits_obj;
    double eps, scaling;
    int threads;
    if (!PyArg_ParseTuple(args, "O(dd)OOOi", &head_obj, &eps, &scaling, &graph_obj, &x_obj, &logits_obj, &threads))
        return NULL;
    Py_buffer hv = {0}, gv = {0}, xv = {0}, lv = {0};
    PyObject *result = NULL;
    if (get_buffer(head_obj, &hv, 0, "head") || get_buffer(graph_obj, &gv, 0, "graph") || get_buffer(x_obj, &xv, 0, "x") ||
        get_buffer(logits_obj, &lv, 1, "logits"))
        goto done;
    if (hv.len != H_SIZE * 8) { PyErr_Format(PyExc_ValueError, "head: expected %d int64", H_SIZE); goto done; }
    const int64_t *v = hv.buf;
    int64_t need = fate_head_bytes(v);
    if (need < 0 || !isfinite(eps) || !isfinite(scaling) || scaling == 0.0) {
        PyErr_SetString(PyExc_ValueError, "head: unsupported numbers or a bad offset");
        goto done;
    }
    if (gv.len < need || xv.len != v[H_HIDDEN] * 4 || lv.len != v[H_VOCAB] * 4) {
        PyErr_SetString(PyExc_ValueError, "run_head: the graph or an array has the wrong size");
        goto done;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fate_run_head(v, (float)eps, (float)scaling, gv.buf, xv.buf, lv.buf, threads);
    Py_END_ALLOW_THREADS
    if (rc != 0) { PyErr_NoMemory(); goto done; }
    Py_INCREF(Py_None);
    result = Py_None;
done:;
    Py_buffer *views[] = {&hv, &gv, &xv, &lv};
    release(NULL, 0, NULL, NULL, views, sizeof views / sizeof *views);
    return result;
}

static PyObject *kernel_name(PyObject *self, PyObject *args) {
    (void)self; (void)args;
    return PyUnicode_FromString(fate_kernel_name());
}

static PyObject *set_kernel(PyObject *self, PyObject *arg) {
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    if (fate_set_kernel(name) == 0) Py_RETURN_NONE;
    PyErr_Format(PyExc_ValueError, "kernel %s is not available on this CPU", name);
    return NULL;
}

static PyObject *kernels(PyObject *self, PyObject *args) {
    (void)self; (void)args;
    const char *names[8];
    int count = fate_kernels(names, 8);
    PyObject *list = PyList_New(count);
    for (int i = 0; list && i < count; i++) {
        PyObject *name = PyUnicode_FromString(names[i]);
        if (!name) { Py_CLEAR(list); break; }
        PyList_SET_ITEM(list, i, name);
    }
    return list;
}

/* ------------------------------------------------------------------ Read: a file read into a slot */

typedef struct {
    PyObject_HEAD
    fate_read *read;
    Py_buffer view; /* the slot, held until the read is over */
} ReadObject;

static int Read_init(ReadObject *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"path", "offset", "length", "buffer", "direct", "urgent", NULL};
    PyObject *path_obj, *buffer;
    long long offset, length;
    int direct, urgent;
    if (self->read) { PyErr_SetString(PyExc_RuntimeError, "Read is started once"); return -1; }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&LLOpp", names, PyUnicode_FSConverter, &path_obj, &offset,
                                     &length, &buffer, &direct, &urgent))
        return -1;
    int rc = -1;
    if (offset < 0 || length < 0) {
        PyErr_SetString(PyExc_ValueError, "offset and length must not be negative");
    } else if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) == 0) {
        if (self->view.len < length) {
            PyErr_SetString(PyExc_ValueError, "the buffer is shorter than the read");
            PyBuffer_Release(&self->view);
        } else {
            self->read = fate_read_start(PyBytes_AS_STRING(path_obj), offset, length, self->view.buf, direct, urgent);
            if (self->read) rc = 0;
            else { PyErr_NoMemory(); PyBuffer_Release(&self->view); }
        }
    }
    Py_DECREF(path_obj);
    return rc;
}

static void Read_dealloc(ReadObject *self) {
    if (self->read) {
        Py_BEGIN_ALLOW_THREADS
        fate_read_free(self->read); /* the slot stays ours until the I/O thread is done with it */
        Py_END_ALLOW_THREADS
        PyBuffer_Release(&self->view);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Read_done(ReadObject *self, PyObject *args) {
    (void)args;
    if (!self->read) { PyErr_SetString(PyExc_RuntimeError, "Read was not started"); return NULL; }
    return PyBool_FromLong(fate_read_done(self->read));
}

static PyObject *Read_cancel(ReadObject *self, PyObject *args) {
    (void)args;
    if (!self->read) { PyErr_SetString(PyExc_RuntimeError, "Read was not started"); return NULL; }
    return PyBool_FromLong(fate_read_cancel(self->read));
}

static PyObject *Read_wait(ReadObject *self, PyObject *args) {
    (void)args;
    if (!self->read) { PyErr_SetString(PyExc_RuntimeError, "Read was not started"); return NULL; }
    Py_BEGIN_ALLOW_THREADS
    fate_read_wait(self->read);
    Py_END_ALLOW_THREADS
    int error, direct_failed;
    int64_t got = fate_read_result(self->read, &error, &direct_failed);
    if (got < 0) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return Py_BuildValue("(LO)", (long long)got, direct_failed ? Py_True : Py_False);
}

static PyMethodDef read_methods[] = {
    {"done", (PyCFunction)Read_done, METH_NOARGS, "Whether the read is over (never blocks)."},
    {"cancel", (PyCFunction)Read_cancel, METH_NOARGS,
     "Take the read off the queue if no I/O thread has begun it: True (wait() then raises OSError ECANCELED)."},
    {"wait", (PyCFunction)Read_wait, METH_NOARGS,
     "Wait (without the GIL) until the read is over: (bytes read, whether O_DIRECT was refused); OSError if it failed."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReadType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fate.runtime._experts.Read",
    .tp_doc = "Read(path, offset, length, buffer, direct, urgent): [offset, offset + length) of a file read into\n"
              "buffer on a native I/O thread; urgent reads go first. The buffer is held until the read is over.",
    .tp_basicsize = sizeof(ReadObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Read_init,
    .tp_dealloc = (destructor)Read_dealloc,
    .tp_methods = read_methods,
};

static PyMethodDef methods[] = {
    {"run_experts", run_experts, METH_VARARGS, run_doc},
    {"run_step", run_step, METH_VARARGS, step_doc},
    {"route_step", route_step, METH_VARARGS, route_doc},
    {"finish_step", finish_step, METH_VARARGS, finish_doc},
    {"add_routed", add_routed, METH_VARARGS, add_routed_doc},
    {"run_prefill", run_prefill, METH_VARARGS, prefill_doc},
    {"run_head", run_head, METH_VARARGS, head_doc},
    {"kernel", kernel_name, METH_NOARGS, "The kernel in use: avx512-vnni, avx-vnni, avx2, neon or portable."},
    {"set_kernel", set_kernel, METH_O, "Use kernel 'best' or one of kernels() (tests compare them)."},
    {"kernels", kernels, METH_NOARGS, "The kernels this CPU can run, best first."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel", "Routed experts from their file bytes.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernel(void) {
    fate_kernel_init();
    if (PyType_Ready(&ReadType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&ReadType);
    if (PyModule_AddObject(m, "Read", (PyObject *)&ReadType) < 0) {
        Py_DECREF(&ReadType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
