"""The one thing pyproject.toml cannot say: asyncwatch's optional C extension.

``asyncwatch._core._ctask`` makes asyncwatch's Task a C type, which costs
each task of a program about 1,500 CPU instructions less than the Python
class it mirrors (issue 15; benchmarks/README.md).  It is optional, as
aiohttp's and yarl's are: without a compiler, or on an interpreter it does
not support, the build goes on without it and asyncwatch uses the Python
class.  ``ASYNCWATCH_NO_EXTENSIONS=1`` skips it at build time as well as at
run time.
"""

import os
import platform
import sysconfig

from setuptools import Extension, setup

ext_modules = []
if (
    not os.environ.get("ASYNCWATCH_NO_EXTENSIONS")
    and platform.python_implementation() == "CPython"
    # A free-threaded build would turn the GIL back on for a module that
    # does not declare it needless (and the C Task's fields are not safe there).
    and not sysconfig.get_config_var("Py_GIL_DISABLED")
):
    ext_modules.append(Extension("asyncwatch._core._ctask", ["src/asyncwatch/_core/_ctask.c"], optional=True))
    # Reads CPython's internal frame layout (3.11-3.13): its own module, so
    # that an interpreter it does not know costs only the exact line of a
    # long operator, never the C Task.
    ext_modules.append(Extension("asyncwatch._core._peek", ["src/asyncwatch/_core/_peek.c"], optional=True))

setup(ext_modules=ext_modules)
