/* asyncwatch._core._ctask: asyncwatch's Task as a C type (issue 15).
 *
 * asyncwatch's tasks are a subclass of asyncio's C Task with three slots
 * and a recorded cancel().  Written in Python, that subclass costs every
 * task of a program about 1,500-2,100 CPU instructions (benchmarks/README.md,
 * "Where a subclass's cost goes") that a C type of the same shape does not:
 *
 * - CPython specializes a call of a C method only when the instance's type is
 *   exactly the type that declares it (Py_IS_TYPE(self, descr->d_common.d_type)
 *   in PRECALL_NO_KW_METHOD_DESCRIPTOR_NOARGS and its siblings), so the five
 *   cancelled()/exception()/result() calls gather makes on each child take the
 *   generic path.  This type declares asyncio's own C methods again, as its
 *   own: the same functions, found first in its dictionary, specialized.
 * - A Python class is traversed by subtype_traverse and freed by
 *   subtype_dealloc, general functions that look its slots up at each call;
 *   this type knows where its fields are.
 *
 * Nothing else differs: the same C Task underneath, the same repr and name,
 * the same finalizer ("Task was destroyed but it is pending!" still sees our
 * fields, which are cleared after it).  The Python methods (cancel(), ...) are
 * set on the type from asyncwatch's Python class, which stays the reference:
 * without this module (no compiler, another interpreter,
 * ASYNCWATCH_NO_EXTENSIONS=1) that class is used as it is.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <time.h>

#ifndef Py_T_OBJECT_EX
#define Py_T_OBJECT_EX T_OBJECT_EX
#define Py_T_PYSSIZET T_PYSSIZET
#define Py_READONLY READONLY
#endif

static void ctask_dealloc(PyObject *self);
static int ctask_traverse(PyObject *self, visitproc visit, void *arg);
static int ctask_clear(PyObject *self);

/* The type made by subclass() that *self* is an instance of, itself or
 * through a Python subclass of it (whose subtype_dealloc/traverse call ours
 * as their base's). */
static PyTypeObject *
ctask_type_of(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    while (tp->tp_dealloc != ctask_dealloc) {
        tp = tp->tp_base;
    }
    return tp;
}

/* Our fields lie after the base's: from its basicsize to ours. */
#define FIELDS(self, tp) ((PyObject **)((char *)(self) + (tp)->tp_base->tp_basicsize))
#define NFIELDS(tp) (((tp)->tp_basicsize - (tp)->tp_base->tp_basicsize) / (Py_ssize_t)sizeof(PyObject *))

static int
ctask_traverse(PyObject *self, visitproc visit, void *arg)
{
    PyTypeObject *tp = ctask_type_of(self);
    PyObject **fields = FIELDS(self, tp);
    for (Py_ssize_t i = 0, n = NFIELDS(tp); i < n; i++) {
        Py_VISIT(fields[i]);
    }
    /* An instance holds a reference to its heap type.  A heap-type base
     * (asyncio's Task from 3.12) visits it; a static one (3.11) does not:
     * visited once either way, as subtype_traverse does. */
    if (!(tp->tp_base->tp_flags & Py_TPFLAGS_HEAPTYPE)) {
        Py_VISIT(Py_TYPE(self));
    }
    return tp->tp_base->tp_traverse(self, visit, arg);
}

static int
ctask_clear(PyObject *self)
{
    PyTypeObject *tp = ctask_type_of(self);
    PyObject **fields = FIELDS(self, tp);
    for (Py_ssize_t i = 0, n = NFIELDS(tp); i < n; i++) {
        Py_CLEAR(fields[i]);
    }
    return tp->tp_base->tp_clear(self);
}

static void
ctask_dealloc(PyObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyTypeObject *tp = ctask_type_of(self);
    /* asyncio's finalizer first, with our fields still set: it reports a
     * pending task or an exception never retrieved, and asyncwatch's handler
     * reads the task's creation site.  It may resurrect the task. */
    if (type->tp_finalize != NULL && PyObject_CallFinalizerFromDealloc(self) < 0) {
        return;
    }
    PyObject_GC_UnTrack(self);
    PyObject **fields = FIELDS(self, tp);
    for (Py_ssize_t i = 0, n = NFIELDS(tp); i < n; i++) {
        Py_CLEAR(fields[i]);
    }
    /* The base's dealloc untracks it again, and frees it.  A heap-type base
     * drops the instance's reference to its type; for a static one we do,
     * after (as subtype_dealloc does). */
    PyObject_GC_Track(self);
    int drop_type = !(tp->tp_base->tp_flags & Py_TPFLAGS_HEAPTYPE);
    tp->tp_base->tp_dealloc(self);
    if (drop_type) {
        Py_DECREF(type);
    }
}

static void
free_members(PyMemberDef *members)
{
    for (PyMemberDef *m = members; m->name != NULL; m++) {
        PyMem_Free((void *)m->name);
    }
    PyMem_Free(members);
}

PyDoc_STRVAR(subclass_doc,
"subclass(base, name, slots, redeclare, /)\n--\n\n"
"A subclass of the C type *base* named *name* (\"module.Name\"), with one\n"
"attribute per name in *slots* (stored in the instance, as __slots__ are),\n"
"that declares *base*'s C methods named in *redeclare* as its own.  Methods\n"
"that need their defining class (METH_METHOD) are left inherited.");

static PyObject *
subclass(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "subclass() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *base = args[0], *name = args[1], *slots = args[2], *redeclare = args[3];
    if (!PyType_Check(base) || !PyUnicode_Check(name) || !PyTuple_Check(slots) || !PyTuple_Check(redeclare)) {
        PyErr_SetString(PyExc_TypeError, "subclass() takes a type, a str and two tuples of str");
        return NULL;
    }
    PyTypeObject *b = (PyTypeObject *)base;
    if (!(b->tp_flags & Py_TPFLAGS_BASETYPE) || !(b->tp_flags & Py_TPFLAGS_HAVE_GC) || b->tp_itemsize != 0 ||
        b->tp_traverse == NULL || b->tp_clear == NULL || b->tp_dealloc == NULL) {
        PyErr_Format(PyExc_TypeError, "%R is not a C type this module can subclass", base);
        return NULL;
    }
    Py_ssize_t nslots = PyTuple_GET_SIZE(slots);
    /* Kept for the type's life: a type never dies in practice (and a
     * PyMemberDef array must outlive it). */
    PyMemberDef *members = PyMem_Calloc((size_t)nslots + 1, sizeof(PyMemberDef));
    if (members == NULL) {
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < nslots; i++) {
        PyObject *slot = PyTuple_GET_ITEM(slots, i);
        const char *slot_name = PyUnicode_Check(slot) ? PyUnicode_AsUTF8(slot) : NULL;
        if (slot_name == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_Format(PyExc_TypeError, "slot names must be str, not %R", slot);
            }
            free_members(members);
            return NULL;
        }
        /* A copy: error messages read it for the type's life. */
        size_t size = strlen(slot_name) + 1;
        char *copy = PyMem_Malloc(size);
        if (copy == NULL) {
            free_members(members);
            return PyErr_NoMemory();
        }
        memcpy(copy, slot_name, size);
        members[i].name = copy;
        members[i].type = Py_T_OBJECT_EX;
        members[i].offset = b->tp_basicsize + i * (Py_ssize_t)sizeof(PyObject *);
    }
    const char *type_name = PyUnicode_AsUTF8(name);
    if (type_name == NULL) {
        free_members(members);
        return NULL;
    }
    PyType_Slot type_slots[] = {
        {Py_tp_dealloc, ctask_dealloc},
        {Py_tp_traverse, ctask_traverse},
        {Py_tp_clear, ctask_clear},
        {Py_tp_members, members},
        {0, NULL},
    };
    PyType_Spec spec = {
        .name = type_name,
        .basicsize = (int)(b->tp_basicsize + nslots * (Py_ssize_t)sizeof(PyObject *)),
        .itemsize = 0,
        .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
        .slots = type_slots,
    };
    PyObject *type = PyType_FromSpecWithBases(&spec, base);
    if (type == NULL) {
        free_members(members);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(redeclare); i++) {
        PyObject *method = PyTuple_GET_ITEM(redeclare, i);
        PyObject *descr = PyObject_GetAttr(base, method);
        if (descr == NULL) {
            Py_DECREF(type);
            return NULL;
        }
        if (!PyObject_TypeCheck(descr, &PyMethodDescr_Type)) {
            PyErr_Format(PyExc_TypeError, "%R of %R is not a C method", method, base);
            Py_DECREF(descr);
            Py_DECREF(type);
            return NULL;
        }
        PyMethodDef *def = ((PyMethodDescrObject *)descr)->d_method;
        int status = 0;
        /* METH_METHOD functions read module state from their defining
         * class, which must stay asyncio's type. */
        if (!(def->ml_flags & METH_METHOD)) {
            PyObject *own = PyDescr_NewMethod((PyTypeObject *)type, def);
            status = own == NULL ? -1 : PyObject_SetAttr(type, method, own);
            Py_XDECREF(own);
        }
        Py_DECREF(descr);
        if (status < 0) {
            Py_DECREF(type);
            return NULL;
        }
    }
    return type;
}


/* ---- The task factory's common path ------------------------------------
 *
 * asyncwatch's default task factory (tasks._make_factory) is a Python
 * function; calling it and running its common path costs every task about
 * 1,500 instructions: a frame, a keyword dict, a dozen bytecodes.  Its common
 * path is a child of a gather() in progress, whose creation site the factory
 * found for the gather's first task: make the Task, store that site, done.
 * FanOut runs just that path in C and hands every other call, unchanged, to
 * the Python function (`slow`), which stays the reference and keeps this
 * object's idea of the fan-out in progress up to date (`fan()`).
 */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *slow;         /* the Python factory: every call not taken here */
    PyObject *task_type;    /* asyncwatch's Task */
    PyObject *state;        /* the TaskFactory: its `enabled` is read per call */
    PyObject *getframe;     /* sys._getframe */
    PyObject *running_loop; /* asyncio.events._get_running_loop */
    PyObject *trim;         /* called with a task whose _source_traceback is set */
    PyObject *frame;        /* the gather frame of the fan-out in progress, or NULL */
    PyObject *depth;        /* its depth as sys._getframe(depth) sees it from here */
    PyObject *site;         /* the creation site of each task it makes */
} FanOut;

static PyObject *str_enabled, *str_aw_site, *str_source_traceback, *str_context, *str_eager_start;

static PyObject *
fanout_call(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    FanOut *self = (FanOut *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (self->frame == NULL || nargs != 2) {
        goto slow;
    }
    if (kwnames != NULL) {
        /* uvloop passes context=None (and on 3.13 eager_start=None) to
         * every call; anything else is the Python function's to handle. */
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nkw; i++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, i);
            if (args[nargs + i] != Py_None || (key != str_context && key != str_eager_start)) {
                goto slow;
            }
        }
    }
    PyObject *enabled = PyObject_GetAttr(self->state, str_enabled);
    if (enabled == NULL) {
        return NULL;
    }
    Py_DECREF(enabled);
    if (enabled != Py_True) {
        goto slow;
    }
    PyObject *running = PyObject_CallNoArgs(self->running_loop);
    if (running == NULL) {
        return NULL;
    }
    Py_DECREF(running);  /* compared by identity only; the loop holds it */
    if (running != args[0]) {
        goto slow;
    }
    PyObject *frame = PyObject_Vectorcall(self->getframe, &self->depth, 1, NULL);
    if (frame == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError)) {  /* not that deep */
            return NULL;
        }
        PyErr_Clear();
        goto slow;
    }
    Py_DECREF(frame);  /* self->frame holds the one we compare with */
    if (frame != self->frame) {
        goto slow;
    }
    PyObject *task = PyObject_Vectorcall(self->task_type, &args[1], 1, NULL);
    if (task == NULL) {
        return NULL;
    }
    if (PyObject_SetAttr(task, str_aw_site, self->site) < 0) {
        Py_DECREF(task);
        return NULL;
    }
    PyObject *source = PyObject_GetAttr(task, str_source_traceback);
    if (source == NULL) {
        Py_DECREF(task);
        return NULL;
    }
    int debug = source != Py_None && PyObject_IsTrue(source);
    Py_DECREF(source);
    if (debug) {  /* asyncio's debug mode: the Python function's helper trims it */
        PyObject *trimmed = PyObject_CallOneArg(self->trim, task);
        if (trimmed == NULL) {
            Py_DECREF(task);
            return NULL;
        }
        Py_DECREF(trimmed);
    }
    return task;
slow:
    return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
}

static PyObject *
fanout_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *slow, *task_type, *state, *getframe, *running_loop, *trim;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "FanOut() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "FanOut", 6, 6, &slow, &task_type, &state, &getframe, &running_loop, &trim)) {
        return NULL;
    }
    FanOut *self = (FanOut *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = fanout_call;
    self->slow = Py_NewRef(slow);
    self->task_type = Py_NewRef(task_type);
    self->state = Py_NewRef(state);
    self->getframe = Py_NewRef(getframe);
    self->running_loop = Py_NewRef(running_loop);
    self->trim = Py_NewRef(trim);
    self->frame = NULL;
    self->depth = NULL;
    self->site = NULL;
    return (PyObject *)self;
}

static int
fanout_traverse(PyObject *op, visitproc visit, void *arg)
{
    FanOut *self = (FanOut *)op;
    Py_VISIT(self->slow);
    Py_VISIT(self->task_type);
    Py_VISIT(self->state);
    Py_VISIT(self->getframe);
    Py_VISIT(self->running_loop);
    Py_VISIT(self->trim);
    Py_VISIT(self->frame);
    Py_VISIT(self->depth);
    Py_VISIT(self->site);
    return 0;
}

static int
fanout_clear(PyObject *op)
{
    FanOut *self = (FanOut *)op;
    Py_CLEAR(self->slow);
    Py_CLEAR(self->task_type);
    Py_CLEAR(self->state);
    Py_CLEAR(self->getframe);
    Py_CLEAR(self->running_loop);
    Py_CLEAR(self->trim);
    Py_CLEAR(self->frame);
    Py_CLEAR(self->depth);
    Py_CLEAR(self->site);
    return 0;
}

static void
fanout_dealloc(PyObject *op)
{
    PyObject_GC_UnTrack(op);
    (void)fanout_clear(op);
    Py_TYPE(op)->tp_free(op);
}

PyDoc_STRVAR(fanout_fan_doc,
"fan(frame, depth, site, /)\n--\n\n"
"The gather frame whose tasks are made now, how deep it lies below the\n"
"Python factory's frame (as its sys._getframe(depth) sees it), and their\n"
"creation site; fan(None, 0, None) when the fan-out is over.");

static PyObject *
fanout_fan(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    FanOut *self = (FanOut *)op;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "fan() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t depth = PyLong_AsSsize_t(args[1]);
    if (depth == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (args[0] == Py_None || depth < 1) {
        Py_CLEAR(self->frame);
        Py_CLEAR(self->depth);
        Py_CLEAR(self->site);
        Py_RETURN_NONE;
    }
    /* Seen from here, in C, the Python factory's own frame is not there:
     * one frame less deep. */
    PyObject *from_here = PyLong_FromSsize_t(depth - 1);
    if (from_here == NULL) {
        return NULL;
    }
    Py_XSETREF(self->depth, from_here);
    Py_XSETREF(self->frame, Py_NewRef(args[0]));
    Py_XSETREF(self->site, Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

static PyMethodDef fanout_methods[] = {
    {"fan", (PyCFunction)(void (*)(void))fanout_fan, METH_FASTCALL, fanout_fan_doc},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef fanout_members[] = {
    {"__vectorcalloffset__", Py_T_PYSSIZET, offsetof(FanOut, vectorcall), Py_READONLY, NULL},
    {"slow", Py_T_OBJECT_EX, offsetof(FanOut, slow), Py_READONLY, "the Python factory"},
    {NULL, 0, 0, 0, NULL},
};

PyDoc_STRVAR(fanout_doc,
"FanOut(slow, task_type, state, getframe, running_loop, trim, /)\n--\n\n"
"A task factory running the common path of asyncwatch's in C: a child of the\n"
"gather() in progress gets that gather's creation site.  Every other call\n"
"goes to *slow*, the Python factory, unchanged.");

static PyTypeObject FanOut_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asyncwatch._core._ctask.FanOut",
    .tp_basicsize = sizeof(FanOut),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = fanout_doc,
    .tp_new = fanout_new,
    .tp_dealloc = fanout_dealloc,
    .tp_traverse = fanout_traverse,
    .tp_clear = fanout_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(FanOut, vectorcall),
    .tp_methods = fanout_methods,
    .tp_members = fanout_members,
};

/* ---- The collector's callbacks --------------------------------------------
 *
 * asyncwatch's two gc.callbacks entries (stall_cause.GcClock, the watchdog's
 * clock of collection time, and _core/collecting.py, which holds findings
 * made by finalizers until a collection is over), in C.  Written in Python,
 * a gc.callbacks function changes what the program does: the interpreter
 * checks for pending signals as it enters any Python function, so a signal
 * that arrives during a long C call (a json.loads, whose allocations start
 * collections) ran its Python handler inside the call, at our callback,
 * instead of after the call returned as under plain python.  A Ctrl-C there
 * raised KeyboardInterrupt inside the callback, which the collector reports
 * as unraisable and drops: the program ran on (the default handler, on a
 * loop run by hand); uvicorn's handler, run twice before its loop could
 * look, skipped its graceful shutdown.  A C callback checks nothing, and
 * costs a collection two clock reads instead of a Python frame (a no-op
 * Python callback alone was 0.7% of an allocation-heavy program's
 * instructions).  Without this module the Python versions are used, and
 * the README says what they change.
 *
 * Both run only in the thread that collects, with the GIL; CPython runs one
 * collection at a time (gcstate->collecting), so one "collecting thread" is
 * the whole state.
 */

#if defined(CLOCK_THREAD_CPUTIME_ID)
#define HAVE_GC_CALLBACKS 1

/* time.perf_counter(), as the watchdog reads it. */
static double
perf_counter(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyTime_t t;
    (void)PyTime_PerfCounterRaw(&t);
    return PyTime_AsSecondsDouble(t);
#else
    return _PyTime_AsSecondsDouble(_PyTime_GetPerfCounter());
#endif
}

/* time.thread_time(), which reads the same clock on every platform that
 * has it. */
static double
thread_time(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0) {
        return 0.0;
    }
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* "start" or "stop": 1, 0; -1 with an exception set for anything else. */
static int
is_start(PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 2 || kwnames != NULL || !PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "a gc callback takes (phase, info)");
        return -1;
    }
    return PyUnicode_CompareWithASCIIString(args[0], "start") == 0;
}

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    double total;         /* CPU seconds in finished collections */
    double started;       /* perf_counter() as the one running began; 0 when none */
    double started_cpu;   /* its thread's thread_time() then */
    unsigned long started_by; /* that thread's threading.get_ident() */
    double floor;         /* collections at least this long (CPU) go to pauses */
    PyObject *pauses;     /* (ended, CPU seconds, began, thread): .append()ed */
} GcTimer;

static PyObject *str_append;

static PyObject *
gctimer_call(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    GcTimer *self = (GcTimer *)op;
    int start = is_start(args, nargsf, kwnames);
    if (start < 0) {
        return NULL;
    }
    if (start) {
        self->started_cpu = thread_time();
        self->started_by = PyThread_get_thread_ident();
        self->started = perf_counter();
        Py_RETURN_NONE;
    }
    if (self->started == 0.0) {  /* installed during this collection */
        Py_RETURN_NONE;
    }
    double spent = thread_time() - self->started_cpu;
    double began = self->started;
    self->total += spent;
    self->started = 0.0;
    if (spent >= self->floor) {
        PyObject *pause = Py_BuildValue("(dddk)", perf_counter(), spent, began, self->started_by);
        if (pause == NULL) {
            return NULL;
        }
        PyObject *done = PyObject_CallMethodOneArg(self->pauses, str_append, pause);
        Py_DECREF(pause);
        if (done == NULL) {
            return NULL;
        }
        Py_DECREF(done);
    }
    Py_RETURN_NONE;
}

static PyObject *
gctimer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *pauses;
    double floor;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "GcTimer() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "Od:GcTimer", &pauses, &floor)) {
        return NULL;
    }
    GcTimer *self = (GcTimer *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = gctimer_call;
    self->floor = floor;
    self->pauses = Py_NewRef(pauses);
    return (PyObject *)self;
}

static int
gctimer_traverse(PyObject *op, visitproc visit, void *arg)
{
    Py_VISIT(((GcTimer *)op)->pauses);
    return 0;
}

static int
gctimer_clear(PyObject *op)
{
    Py_CLEAR(((GcTimer *)op)->pauses);
    return 0;
}

static void
gctimer_dealloc(PyObject *op)
{
    PyObject_GC_UnTrack(op);
    (void)gctimer_clear(op);
    Py_TYPE(op)->tp_free(op);
}

static PyMemberDef gctimer_members[] = {
    {"__vectorcalloffset__", Py_T_PYSSIZET, offsetof(GcTimer, vectorcall), Py_READONLY, NULL},
    {"total", T_DOUBLE, offsetof(GcTimer, total), Py_READONLY, NULL},
    {"started", T_DOUBLE, offsetof(GcTimer, started), Py_READONLY, NULL},
    {"started_cpu", T_DOUBLE, offsetof(GcTimer, started_cpu), Py_READONLY, NULL},
    {"started_by", T_ULONG, offsetof(GcTimer, started_by), Py_READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

PyDoc_STRVAR(gctimer_doc,
"GcTimer(pauses, floor, /)\n--\n\n"
"A gc.callbacks entry timing collections: their CPU time (`total`), the one\n"
"running (`started`, `started_cpu`, `started_by`; `started` 0.0 when none),\n"
"and (ended, CPU seconds, began, thread) appended to *pauses* for each at\n"
"least *floor* seconds long.");

static PyTypeObject GcTimer_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asyncwatch._core._ctask.GcTimer",
    .tp_basicsize = sizeof(GcTimer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = gctimer_doc,
    .tp_new = gctimer_new,
    .tp_dealloc = gctimer_dealloc,
    .tp_traverse = gctimer_traverse,
    .tp_clear = gctimer_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(GcTimer, vectorcall),
    .tp_members = gctimer_members,
};

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    unsigned long thread; /* threading.get_ident() of the thread collecting; 0 when none */
    char held;            /* a detector held something during this collection */
    PyObject *flushes;    /* a tuple: each called after a collection that held something */
} Collecting;

static PyObject *
collecting_call(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Collecting *self = (Collecting *)op;
    int start = is_start(args, nargsf, kwnames);
    if (start < 0) {
        return NULL;
    }
    if (start) {
        self->thread = PyThread_get_thread_ident();
        Py_RETURN_NONE;
    }
    self->thread = 0;
    if (!self->held) {
        Py_RETURN_NONE;
    }
    self->held = 0;
    PyObject *flushes = Py_NewRef(self->flushes);  /* a flush may replace it */
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(flushes); i++) {
        PyObject *done = PyObject_CallNoArgs(PyTuple_GET_ITEM(flushes, i));
        if (done == NULL) {
            Py_DECREF(flushes);
            return NULL;
        }
        Py_DECREF(done);
    }
    Py_DECREF(flushes);
    Py_RETURN_NONE;
}

static PyObject *
collecting_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Collecting() takes no arguments");
        return NULL;
    }
    Collecting *self = (Collecting *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = collecting_call;
    self->flushes = PyTuple_New(0);
    if (self->flushes == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
collecting_set_flushes(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL || !PyTuple_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "flushes must be a tuple");
        return -1;
    }
    Py_SETREF(((Collecting *)op)->flushes, Py_NewRef(value));
    return 0;
}

static PyObject *
collecting_get_flushes(PyObject *op, void *Py_UNUSED(closure))
{
    return Py_NewRef(((Collecting *)op)->flushes);
}

static int
collecting_traverse(PyObject *op, visitproc visit, void *arg)
{
    Py_VISIT(((Collecting *)op)->flushes);
    return 0;
}

static int
collecting_clear(PyObject *op)
{
    Py_CLEAR(((Collecting *)op)->flushes);
    return 0;
}

static void
collecting_dealloc(PyObject *op)
{
    PyObject_GC_UnTrack(op);
    (void)collecting_clear(op);
    Py_TYPE(op)->tp_free(op);
}

static PyMemberDef collecting_members[] = {
    {"__vectorcalloffset__", Py_T_PYSSIZET, offsetof(Collecting, vectorcall), Py_READONLY, NULL},
    {"thread", T_ULONG, offsetof(Collecting, thread), 0, NULL},
    {"held", T_BOOL, offsetof(Collecting, held), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef collecting_getset[] = {
    {"flushes", collecting_get_flushes, collecting_set_flushes, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(collecting_doc,
"Collecting()\n--\n\n"
"A gc.callbacks entry keeping which thread collects (`thread`, 0 when none)\n"
"and, after a collection during which `held` was set, calling each of\n"
"`flushes` (a tuple) and clearing `held`.");

static PyTypeObject Collecting_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asyncwatch._core._ctask.Collecting",
    .tp_basicsize = sizeof(Collecting),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = collecting_doc,
    .tp_new = collecting_new,
    .tp_dealloc = collecting_dealloc,
    .tp_traverse = collecting_traverse,
    .tp_clear = collecting_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Collecting, vectorcall),
    .tp_members = collecting_members,
    .tp_getset = collecting_getset,
};
#endif /* CLOCK_THREAD_CPUTIME_ID */

/* ---- Hooks in no traceback ---------------------------------------------
 *
 * asyncwatch sees a loop start by patching asyncio methods such as
 * BaseEventLoop.run_until_complete.  A Python wrapper is a frame of ours in
 * every traceback that passes through it: every program that crashed under
 * asyncio.run() showed asyncwatch's _patches.py between runners.py and
 * base_events.py.  Hooked calls the hook and then the original from C,
 * which adds no frame: the traceback is plain python's.
 */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *before;    /* called with the arguments first, or None */
    PyObject *original;  /* the patched callable */
    PyObject *after;     /* called with the arguments once it returned, or None */
    PyObject *dict;      /* __dict__, for functools-style metadata */
} Hooked;

/* A hook contains its own errors; one that escapes is reported as
 * unraisable, never raised into the program's call. */
static void
run_hook(PyObject *hook, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (hook == Py_None) {
        return;
    }
    PyObject *done = PyObject_Vectorcall(hook, args, nargsf, kwnames);
    if (done == NULL) {
        PyErr_WriteUnraisable(hook);
        return;
    }
    Py_DECREF(done);
}

static PyObject *
hooked_call(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Hooked *self = (Hooked *)op;
    run_hook(self->before, args, nargsf, kwnames);
    PyObject *result = PyObject_Vectorcall(self->original, args, nargsf, kwnames);
    if (result != NULL) {
        run_hook(self->after, args, nargsf, kwnames);
    }
    return result;
}

static PyObject *
hooked_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *before, *original, *after;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "Hooked() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "Hooked", 3, 3, &before, &original, &after)) {
        return NULL;
    }
    if (!PyCallable_Check(original) || (before != Py_None && !PyCallable_Check(before)) ||
        (after != Py_None && !PyCallable_Check(after))) {
        PyErr_SetString(PyExc_TypeError, "Hooked(before, original, after): callables (a hook may be None)");
        return NULL;
    }
    Hooked *self = (Hooked *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = hooked_call;
    self->before = Py_NewRef(before);
    self->original = Py_NewRef(original);
    self->after = Py_NewRef(after);
    self->dict = NULL;
    return (PyObject *)self;
}

/* Bound like a function: looked up on an instance, a method of it. */
static PyObject *
hooked_get(PyObject *op, PyObject *obj, PyObject *Py_UNUSED(type))
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(op);
    }
    return PyMethod_New(op, obj);
}

/* As the callable it hooks (a hook is asyncwatch's business, not the program's). */
static PyObject *
hooked_repr(PyObject *op)
{
    return PyObject_Repr(((Hooked *)op)->original);
}

static int
hooked_traverse(PyObject *op, visitproc visit, void *arg)
{
    Hooked *self = (Hooked *)op;
    Py_VISIT(self->before);
    Py_VISIT(self->original);
    Py_VISIT(self->after);
    Py_VISIT(self->dict);
    return 0;
}

static int
hooked_clear(PyObject *op)
{
    Hooked *self = (Hooked *)op;
    Py_CLEAR(self->before);
    Py_CLEAR(self->original);
    Py_CLEAR(self->after);
    Py_CLEAR(self->dict);
    return 0;
}

static void
hooked_dealloc(PyObject *op)
{
    PyObject_GC_UnTrack(op);
    (void)hooked_clear(op);
    Py_TYPE(op)->tp_free(op);
}

static PyMemberDef hooked_members[] = {
    {"__vectorcalloffset__", Py_T_PYSSIZET, offsetof(Hooked, vectorcall), Py_READONLY, NULL},
    {"__wrapped__", Py_T_OBJECT_EX, offsetof(Hooked, original), Py_READONLY, "the patched callable"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef hooked_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(hooked_doc,
"Hooked(before, original, after, /)\n--\n\n"
"Calls *before* (unless None), then *original*, then, if it returned,\n"
"*after* (unless None), each with the arguments it was called with, and\n"
"returns what *original* returned, with no Python frame of its own.  Bound\n"
"as a method when found on an instance.  A hook's exception is reported as\n"
"unraisable, never raised.");

static PyTypeObject Hooked_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asyncwatch._core._ctask.Hooked",
    .tp_basicsize = sizeof(Hooked),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = hooked_doc,
    .tp_new = hooked_new,
    .tp_dealloc = hooked_dealloc,
    .tp_traverse = hooked_traverse,
    .tp_clear = hooked_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Hooked, vectorcall),
    .tp_descr_get = hooked_get,
    .tp_repr = hooked_repr,
    .tp_members = hooked_members,
    .tp_getset = hooked_getset,
    .tp_dictoffset = offsetof(Hooked, dict),
};

static PyMethodDef ctask_methods[] = {
    {"subclass", (PyCFunction)(void (*)(void))subclass, METH_FASTCALL, subclass_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef ctask_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "asyncwatch._core._ctask",
    .m_doc = "asyncwatch's Task as a C type: see _ctask.c.",
    .m_size = -1,
    .m_methods = ctask_methods,
};

PyMODINIT_FUNC
PyInit__ctask(void)
{
    if ((str_enabled = PyUnicode_InternFromString("enabled")) == NULL ||
        (str_aw_site = PyUnicode_InternFromString("_aw_site")) == NULL ||
        (str_source_traceback = PyUnicode_InternFromString("_source_traceback")) == NULL ||
        (str_context = PyUnicode_InternFromString("context")) == NULL ||
        (str_eager_start = PyUnicode_InternFromString("eager_start")) == NULL || PyType_Ready(&FanOut_Type) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&ctask_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObject(module, "FanOut", Py_NewRef(&FanOut_Type)) < 0) {
        Py_DECREF(&FanOut_Type);
        Py_DECREF(module);
        return NULL;
    }
    if (PyType_Ready(&Hooked_Type) < 0 || PyModule_AddObject(module, "Hooked", Py_NewRef(&Hooked_Type)) < 0) {
        Py_DECREF(module);
        return NULL;
    }
#ifdef HAVE_GC_CALLBACKS
    if ((str_append = PyUnicode_InternFromString("append")) == NULL || PyType_Ready(&GcTimer_Type) < 0 ||
        PyType_Ready(&Collecting_Type) < 0 || PyModule_AddObject(module, "GcTimer", Py_NewRef(&GcTimer_Type)) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    if (PyModule_AddObject(module, "Collecting", Py_NewRef(&Collecting_Type)) < 0) {
        Py_DECREF(module);
        return NULL;
    }
#endif
    return module;
}
