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
    return module;
}
