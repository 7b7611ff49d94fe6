/* asyncwatch._core._peek: the loop thread's stack, read without the GIL
 * (issue 12).
 *
 * One long operation that holds the GIL (a json.loads, `big * big`,
 * `x in forty_million_ints`) keeps the watchdog from looking until it is
 * over: the loop thread lets the GIL go at its next eval-breaker check, which
 * after a C call is the call's own line, but after an operator may be lines
 * on, or in the caller once the function has returned (a corpus's `in` on a
 * large list was reported at the caller's print()).  faulthandler reads every
 * thread's frames without the GIL to dump them; this module does the same for
 * the one loop thread, when its deadline passes, while the watchdog thread
 * waits in poll(2) without the GIL.
 *
 * It never dereferences the other thread's memory: every read is a
 * process_vm_readv() of our own process, which fails with EFAULT where a
 * plain read would crash (the thread may move on, and free a frame's data
 * chunk, while we read).  A stack is kept only when the thread stood at the
 * same instruction of the same frame before, across a millisecond, and
 * after the read: stuck in one operation, whose line it is.
 *
 * Built against CPython's internal frame layout (Py_BUILD_CORE), which
 * changes in each minor version: 3.11 to 3.13 here.  Without this module
 * the watchdog looks as before (the line where the GIL was let go).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030E0000 && defined(__linux__)
#define PEEK_SUPPORTED 1
#define Py_BUILD_CORE 1
#include "internal/pycore_frame.h"
#undef Py_BUILD_CORE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <limits.h>
#endif

#ifdef PEEK_SUPPORTED

#define MAX_FRAMES 64
#define MAX_TEXT 512                 /* a file name or qualified name, in bytes */
#define MAX_LINETABLE (1 << 20)      /* a code object's location table */

#if PY_VERSION_HEX >= 0x030D0000
#define FRAME_CODE(f) ((f)->f_executable)
#define FRAME_INSTR(f) ((f)->instr_ptr)
#else
#define FRAME_CODE(f) ((PyObject *)(f)->f_code)
#define FRAME_INSTR(f) ((f)->prev_instr)
#endif

static int unreadable; /* process_vm_readv refused (seccomp, no kernel support): never again */

/* Copy *n* bytes at *src*, in this process, into *dst*; -1 where they are
 * not all mapped (or the call is refused). */
static int
copy_in(void *dst, const void *src, size_t n)
{
    if (unreadable || src == NULL) {
        return -1;
    }
    struct iovec local = {dst, n};
    struct iovec remote = {(void *)src, n};
    /* getpid() each time: a forked child must read its own memory, not its parent's. */
    ssize_t got = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
    if (got < 0 && (errno == ENOSYS || errno == EPERM)) {
        unreadable = 1;
    }
    return got == (ssize_t)n ? 0 : -1;
}

/* The thread's innermost frame, or NULL. */
static struct _PyInterpreterFrame *
current_frame(PyThreadState *tstate)
{
#if PY_VERSION_HEX >= 0x030D0000
    struct _PyInterpreterFrame *frame = NULL;
    if (copy_in(&frame, (char *)tstate + offsetof(PyThreadState, current_frame), sizeof(frame)) < 0) {
        return NULL;
    }
    return frame;
#else
    _PyCFrame *cframe = NULL;
    struct _PyInterpreterFrame *frame = NULL;
    if (copy_in(&cframe, (char *)tstate + offsetof(PyThreadState, cframe), sizeof(cframe)) < 0 ||
        copy_in(&frame, (char *)cframe + offsetof(_PyCFrame, current_frame), sizeof(frame)) < 0) {
        return NULL;
    }
    return frame;
#endif
}

/* Where the thread stands: its innermost frame and that frame's instruction. */
typedef struct {
    struct _PyInterpreterFrame *frame;
    _Py_CODEUNIT *instr;
} Position;

static int
position(PyThreadState *tstate, Position *at)
{
    struct _PyInterpreterFrame copy;
    at->frame = current_frame(tstate);
    if (at->frame == NULL || copy_in(&copy, at->frame, sizeof(copy)) < 0) {
        return -1;
    }
    at->instr = FRAME_INSTR(&copy);
    return 0;
}

static unsigned int
scan_varint(const unsigned char *table, Py_ssize_t len, Py_ssize_t *i)
{
    unsigned int value = 0, shift = 0;
    while (*i < len) {
        unsigned int read = table[(*i)++];
        value |= (read & 63) << shift;
        if (!(read & 64) || shift > 24) {
            break;
        }
        shift += 6;
    }
    return value;
}

/* The line of code unit *target*, from a copy of co_linetable (the format
 * of CPython's Objects/locations.md, the same in 3.11-3.13); -1 for none. */
static int
line_of(const unsigned char *table, Py_ssize_t len, int firstlineno, Py_ssize_t target)
{
    int line = firstlineno;
    Py_ssize_t unit = 0, i = 0;
    if (target < 0) {
        return firstlineno;
    }
    while (i < len) {
        unsigned char first = table[i];
        if (!(first & 128)) {
            return -1;
        }
        int code = (first >> 3) & 15;
        Py_ssize_t length = (first & 7) + 1;
        int delta = 0;
        Py_ssize_t j = i + 1;
        if (code == 13 || code == 14) { /* no columns; long form */
            unsigned int raw = scan_varint(table, len, &j);
            delta = (raw & 1) ? -(int)(raw >> 1) : (int)(raw >> 1);
        }
        else if (code >= 10 && code <= 12) { /* one line, on this or one or two lines on */
            delta = code - 10;
        }
        line += delta;
        if (target < unit + length) {
            return code == 15 ? -1 : line;
        }
        unit += length;
        do { /* the next entry begins at the next byte with its top bit set */
            i++;
        } while (i < len && !(table[i] & 128));
    }
    return -1;
}

/* A str's text, copied: compact ASCII or Latin-1 only (a path with other
 * characters gives up the stack, never a wrong name). */
static Py_ssize_t
copy_text(PyObject *str, char *out)
{
    PyASCIIObject head;
    if (copy_in(&head, str, sizeof(head)) < 0 || head.ob_base.ob_type != &PyUnicode_Type || !head.state.compact ||
        head.state.kind != PyUnicode_1BYTE_KIND || head.length < 0 || head.length > MAX_TEXT) {
        return -1;
    }
    const char *data = head.state.ascii ? (const char *)str + sizeof(PyASCIIObject)
                                        : (const char *)str + sizeof(PyCompactUnicodeObject);
    if (copy_in(out, data, (size_t)head.length) < 0) {
        return -1;
    }
    return head.length;
}

typedef struct {
    char file[MAX_TEXT];
    char name[MAX_TEXT];
    Py_ssize_t file_len, name_len;
    int line;
    int lasti; /* the instruction, in code units */
    int latin1; /* the texts are Latin-1, not ASCII */
} Entry;

typedef struct {
    Entry entries[MAX_FRAMES];
    int count;
} Stack;

static int
is_latin1(PyObject *str)
{
    PyASCIIObject head;
    return copy_in(&head, str, sizeof(head)) == 0 && !head.state.ascii;
}

/* One frame's entry; 1 when it is not a Python function's frame (a C
 * stack's shim), 0 when read, -1 when it could not be. */
static int
read_entry(struct _PyInterpreterFrame *copy, Entry *entry, unsigned char *table)
{
    PyObject *code_ptr = FRAME_CODE(copy);
    PyCodeObject code;
#if PY_VERSION_HEX >= 0x030C0000
    if (copy->owner == FRAME_OWNED_BY_CSTACK) {
        return 1;
    }
#endif
    if (copy_in(&code, code_ptr, sizeof(code)) < 0 || code.ob_base.ob_base.ob_type != &PyCode_Type) {
        return -1;
    }
    Py_ssize_t units = code.ob_base.ob_size;
    Py_ssize_t lasti = FRAME_INSTR(copy) - (_Py_CODEUNIT *)((char *)code_ptr + offsetof(PyCodeObject, co_code_adaptive));
    if (lasti >= units) {
        return -1;
    }
    PyBytesObject table_head;
    if (copy_in(&table_head, code.co_linetable, offsetof(PyBytesObject, ob_sval)) < 0 ||
        table_head.ob_base.ob_base.ob_type != &PyBytes_Type) {
        return -1;
    }
    Py_ssize_t len = table_head.ob_base.ob_size;
    if (len < 0 || len > MAX_LINETABLE ||
        copy_in(table, (char *)code.co_linetable + offsetof(PyBytesObject, ob_sval), (size_t)len) < 0) {
        return -1;
    }
    entry->line = line_of(table, len, code.co_firstlineno, lasti);
    entry->lasti = (int)lasti;
    entry->file_len = copy_text(code.co_filename, entry->file);
    entry->name_len = copy_text(code.co_qualname, entry->name);
    if (entry->file_len < 0 || entry->name_len < 0) {
        return -1;
    }
    entry->latin1 = is_latin1(code.co_filename) || is_latin1(code.co_qualname);
    return 0;
}

/* The thread's stack, innermost first; -1 where any of it could not be read. */
static int
read_stack(struct _PyInterpreterFrame *frame, Stack *stack, unsigned char *table)
{
    stack->count = 0;
    while (frame != NULL && stack->count < MAX_FRAMES) {
        struct _PyInterpreterFrame copy;
        if (copy_in(&copy, frame, sizeof(copy)) < 0) {
            return -1;
        }
        int read = read_entry(&copy, &stack->entries[stack->count], table);
        if (read < 0) {
            return -1;
        }
        if (read == 0) {
            stack->count++;
        }
        frame = copy.previous;
    }
    return 0;
}

/* The thread's stack, when the read found it where it was a sample before
 * (*prev*) and still there after: stuck in one operation.  Updates *prev*. */
static int
read_if_still(PyThreadState *tstate, Position *prev, Stack *stack, unsigned char *table)
{
    Position now, last;
    if (position(tstate, &now) < 0) {
        prev->frame = NULL;
        return -1;
    }
    int still = now.frame == prev->frame && now.instr == prev->instr;
    *prev = now;
    if (!still || read_stack(now.frame, stack, table) < 0 || stack->count == 0) {
        return -1;
    }
    if (position(tstate, &last) < 0 || last.frame != now.frame || last.instr != now.instr) {
        return -1;
    }
    return 0;
}

/* The peeker: a thread of the C library's (no Python thread state, never
 * the GIL) that samples the watched loop threads every millisecond while
 * the watchdog waits for the GIL, and keeps each one's last still stack.
 * The deadline passes a tenth of the threshold after the loop's last tick,
 * and the step may begin after: read only as the wait ended, the stack was
 * the way to the operation, not the operation (v27 on 3.13, 4 runs in 6). */
#define MAX_WATCHED 16

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int started;
    int active;                      /* a watchdog waits for the GIL */
    int count;
    PyThreadState *threads[MAX_WATCHED];
    int have[MAX_WATCHED];           /* stacks[k] holds a still stack */
    int have_earlier[MAX_WATCHED];   /* earlier[k] holds the one before, elsewhere */
    Stack *stacks;                   /* MAX_WATCHED of them: the last still stack */
    Stack *earlier;                  /* the last one still at another instruction */
    Stack *scratch;
    unsigned char *table;
} peeker = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static void *
peeker_main(void *unused)
{
    Position prev[MAX_WATCHED], kept[MAX_WATCHED];
    struct timespec pause = {0, 1000000};
    pthread_mutex_lock(&peeker.lock);
    for (;;) {
        while (!peeker.active) {
            pthread_cond_wait(&peeker.wake, &peeker.lock);
            memset(prev, 0, sizeof(prev));
            memset(kept, 0, sizeof(kept));
        }
        int count = peeker.count;
        PyThreadState *threads[MAX_WATCHED];
        memcpy(threads, peeker.threads, sizeof(threads));
        pthread_mutex_unlock(&peeker.lock);
        for (int k = 0; k < count; k++) {
            if (threads[k] == NULL) {
                continue;
            }
            int still = read_if_still(threads[k], &prev[k], peeker.scratch, peeker.table) == 0;
            if (still) {
                pthread_mutex_lock(&peeker.lock);
                if (peeker.active) { /* else the watchdog has its answer: leave it */
                    /* The loop thread also stands still where it waits for
                     * the GIL it let go, and the last still stack is then
                     * that, not the operation: the one before is kept too. */
                    if (peeker.have[k] && (kept[k].frame != prev[k].frame || kept[k].instr != prev[k].instr)) {
                        memcpy(&peeker.earlier[k], &peeker.stacks[k], sizeof(Stack));
                        peeker.have_earlier[k] = 1;
                    }
                    memcpy(&peeker.stacks[k], peeker.scratch, sizeof(Stack));
                    peeker.have[k] = 1;
                    kept[k] = prev[k];
                }
                pthread_mutex_unlock(&peeker.lock);
            }
        }
        nanosleep(&pause, NULL);
        pthread_mutex_lock(&peeker.lock);
    }
    return NULL;
}

static void
peeker_after_fork(void)
{
    /* Only the forking thread survives: no peeker, and a lock it may have held. */
    pthread_mutex_init(&peeker.lock, NULL);
    pthread_cond_init(&peeker.wake, NULL);
    peeker.started = 0;
    peeker.active = 0;
}

/* Start it, once (with the GIL: the buffers are allocated here); 0 on success. */
static int
peeker_start(void)
{
    if (peeker.started) {
        return 0;
    }
    if (peeker.stacks == NULL) {
        peeker.stacks = PyMem_RawMalloc(sizeof(Stack) * MAX_WATCHED);
        peeker.earlier = PyMem_RawMalloc(sizeof(Stack) * MAX_WATCHED);
        peeker.scratch = PyMem_RawMalloc(sizeof(Stack));
        peeker.table = PyMem_RawMalloc(MAX_LINETABLE);
        if (peeker.stacks == NULL || peeker.earlier == NULL || peeker.scratch == NULL || peeker.table == NULL) {
            return -1;
        }
        pthread_atfork(NULL, NULL, peeker_after_fork);
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    /* Signals are for the program's threads: block them all in this one. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pthread_t thread;
    int failed = pthread_create(&thread, &attr, peeker_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (failed) {
        return -1;
    }
    peeker.started = 1;
    return 0;
}

static PyObject *
text(const char *data, Py_ssize_t len, int latin1)
{
    return latin1 ? PyUnicode_DecodeLatin1(data, len, NULL) : PyUnicode_FromStringAndSize(data, len);
}

/* ((file, line, qualname, lasti), ...), innermost first. */
static PyObject *
stack_tuple(const Stack *stack)
{
    PyObject *result = PyTuple_New(stack->count);
    if (result == NULL) {
        return NULL;
    }
    for (int k = 0; k < stack->count; k++) {
        const Entry *e = &stack->entries[k];
        PyObject *item = Py_BuildValue("(NiNi)", text(e->file, e->file_len, e->latin1), e->line,
                                       text(e->name, e->name_len, e->latin1), e->lasti);
        if (item == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        PyTuple_SET_ITEM(result, k, item);
    }
    return result;
}

PyDoc_STRVAR(thread_state_doc,
"thread_state() -> int\n\n"
"The calling thread's state, as an address for poll() to read its stack by.");

static PyObject *
thread_state(PyObject *module, PyObject *unused)
{
    return PyLong_FromVoidPtr(PyThreadState_Get());
}

PyDoc_STRVAR(poll_doc,
"poll(fds, timeout_ms, watched) -> (ready, stacks)\n\n"
"poll(2) on *fds* for reading, without the GIL, for at most *timeout_ms*\n"
"(negative: no limit).  *watched*: ((key, thread_state, always), ...): for\n"
"each whose key is a ready fd, or that is *always*, the stack of that\n"
"thread, read before the GIL is taken back, when the thread stood still.\n"
"*ready*: the ready fds; *stacks*: {key: (last, earlier?)}: the last\n"
"stack the thread stood still in and, where it stood still elsewhere\n"
"before, that one; a stack is\n"
"((file, line, qualname, lasti), ...), innermost first\n"
"(*lasti*: the frame's instruction, in code units).  Interrupted by a\n"
"signal, it returns as a timeout does.");

#define MAX_FDS 64

static int
as_int(PyObject *value, int *out)
{
    long v = PyLong_AsLong(value);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "poll(): a value out of an int's range");
        return -1;
    }
    *out = (int)v;
    return 0;
}

static PyObject *
peek_poll(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyTuple_Check(args[0]) || !PyTuple_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "poll(fds: tuple, timeout_ms: int, watched: tuple)");
        return NULL;
    }
    Py_ssize_t nfds = PyTuple_GET_SIZE(args[0]);
    Py_ssize_t nwatched = PyTuple_GET_SIZE(args[2]);
    if (nfds > MAX_FDS || nwatched > MAX_FDS) {
        PyErr_SetString(PyExc_ValueError, "poll(): too many descriptors");
        return NULL;
    }
    int timeout;
    if (as_int(args[1], &timeout) < 0) {
        return NULL;
    }
    struct pollfd fds[MAX_FDS];
    int watched_fd[MAX_FDS];
    int watched_always[MAX_FDS];
    PyThreadState *watched_ts[MAX_FDS];
    for (Py_ssize_t k = 0; k < nfds; k++) {
        int fd;
        if (as_int(PyTuple_GET_ITEM(args[0], k), &fd) < 0) {
            return NULL;
        }
        fds[k].fd = fd;
        fds[k].events = POLLIN;
        fds[k].revents = 0;
    }
    for (Py_ssize_t k = 0; k < nwatched; k++) {
        PyObject *pair = PyTuple_GET_ITEM(args[2], k);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 3) {
            PyErr_SetString(PyExc_TypeError, "poll(): watched holds (key, thread_state, always) triples");
            return NULL;
        }
        if (as_int(PyTuple_GET_ITEM(pair, 0), &watched_fd[k]) < 0 ||
            as_int(PyTuple_GET_ITEM(pair, 2), &watched_always[k]) < 0) {
            return NULL;
        }
        watched_ts[k] = (PyThreadState *)PyLong_AsVoidPtr(PyTuple_GET_ITEM(pair, 1));
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    int use_peeker = nwatched > 0 && !unreadable && peeker_start() == 0;
    int got, error = 0;
    Py_BEGIN_ALLOW_THREADS
    got = poll(fds, (nfds_t)nfds, timeout);
    if (got < 0) {
        error = errno;
        if (error == EINTR) {
            got = 0; /* the caller looks, and waits again */
        }
    }
    if (got >= 0 && use_peeker) {
        int due[MAX_FDS] = {0}, count = 0;
        for (Py_ssize_t w = 0; w < nwatched && w < MAX_WATCHED; w++) {
            due[w] = watched_always[w] && watched_ts[w] != NULL;
            for (Py_ssize_t k = 0; k < nfds && !due[w]; k++) {
                due[w] = fds[k].fd == watched_fd[w] && (fds[k].revents & POLLIN) && watched_ts[w] != NULL;
            }
        }
        pthread_mutex_lock(&peeker.lock);
        for (Py_ssize_t w = 0; w < nwatched && w < MAX_WATCHED; w++) {
            /* Not due: a thread state no one will read, so the peeker samples nothing there. */
            peeker.threads[w] = due[w] ? watched_ts[w] : NULL;
            peeker.have[w] = 0;
            peeker.have_earlier[w] = 0;
            count = (int)w + 1;
        }
        peeker.count = count;
        peeker.active = 1;
        pthread_cond_signal(&peeker.wake);
        pthread_mutex_unlock(&peeker.lock);
    }
    Py_END_ALLOW_THREADS
    /* Took the GIL back: the peeker's last still stacks are the answer. */
    int peeked[MAX_FDS] = {0}, earlier[MAX_FDS] = {0};
    Stack *stacks = NULL; /* the last still stacks, then the earlier ones */
    if (use_peeker) {
        pthread_mutex_lock(&peeker.lock);
        peeker.active = 0;
        int any = 0;
        for (Py_ssize_t w = 0; w < nwatched && w < MAX_WATCHED; w++) {
            peeked[w] = got >= 0 && peeker.have[w];
            earlier[w] = peeked[w] && peeker.have_earlier[w];
            any |= peeked[w];
        }
        if (any) {
            stacks = PyMem_RawMalloc(sizeof(Stack) * MAX_WATCHED * 2);
            if (stacks != NULL) {
                memcpy(stacks, peeker.stacks, sizeof(Stack) * MAX_WATCHED);
                memcpy(stacks + MAX_WATCHED, peeker.earlier, sizeof(Stack) * MAX_WATCHED);
            }
            else {
                memset(peeked, 0, sizeof(peeked));
            }
        }
        pthread_mutex_unlock(&peeker.lock);
    }
    PyObject *ready = NULL, *found = NULL, *result = NULL;
    if (got < 0) {
        errno = error;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    ready = PyList_New(0);
    found = PyDict_New();
    if (ready == NULL || found == NULL) {
        goto done;
    }
    for (Py_ssize_t k = 0; k < nfds && got > 0; k++) {
        if (fds[k].revents) {
            PyObject *fd = PyLong_FromLong(fds[k].fd);
            if (fd == NULL || PyList_Append(ready, fd) < 0) {
                Py_XDECREF(fd);
                goto done;
            }
            Py_DECREF(fd);
        }
    }
    for (Py_ssize_t w = 0; w < nwatched; w++) {
        if (!peeked[w]) {
            continue;
        }
        PyObject *fd = PyLong_FromLong(watched_fd[w]);
        PyObject *last = fd != NULL ? stack_tuple(&stacks[w]) : NULL;
        PyObject *before = last != NULL && earlier[w] ? stack_tuple(&stacks[MAX_WATCHED + w]) : NULL;
        PyObject *stack = NULL;
        if (last != NULL && (before != NULL || !earlier[w])) {
            stack = before != NULL ? PyTuple_Pack(2, last, before) : PyTuple_Pack(1, last);
        }
        Py_XDECREF(last);
        Py_XDECREF(before);
        int failed = stack == NULL || PyDict_SetItem(found, fd, stack) < 0;
        Py_XDECREF(fd);
        Py_XDECREF(stack);
        if (failed) {
            goto done;
        }
    }
    result = PyTuple_Pack(2, ready, found);
done:
    Py_XDECREF(ready);
    Py_XDECREF(found);
    PyMem_RawFree(stacks);
    return result;
}

static PyMethodDef peek_methods[] = {
    {"thread_state", thread_state, METH_NOARGS, thread_state_doc},
    {"poll", (PyCFunction)(void (*)(void))peek_poll, METH_FASTCALL, poll_doc},
    {NULL, NULL, 0, NULL},
};

static int
peek_exec(PyObject *module)
{
    return 0;
}

#else /* not PEEK_SUPPORTED: a module with nothing in it, which asyncwatch does not use */

static PyMethodDef peek_methods[] = {
    {NULL, NULL, 0, NULL},
};

static int
peek_exec(PyObject *module)
{
    return 0;
}

#endif

static PyModuleDef_Slot peek_slots[] = {
    {Py_mod_exec, peek_exec},
    {0, NULL},
};

static struct PyModuleDef peek_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "asyncwatch._core._peek",
    .m_doc = "The loop thread's stack, read without the GIL when its deadline passes.",
    .m_size = 0,
    .m_methods = peek_methods,
    .m_slots = peek_slots,
};

PyMODINIT_FUNC
PyInit__peek(void)
{
    return PyModuleDef_Init(&peek_module);
}
