"""The first line of a submitted job's entrypoint: can this Python import what stylegen needs?

A job whose head-node ``python`` is not the environment with the dependencies (``ray start`` run by its full
path, a system Python) otherwise fails with a ``ModuleNotFoundError`` traceback deep in its log. This prints
one line naming the missing modules and the fixes, and exits 2. Standard library only, and syntax any Python >= 3.6
parses: it runs before anything is known about the interpreter.

    python -m jobs.depcheck MODULE [MODULE ...]
"""

import importlib.util
import sys

REQUIRES = (3, 11)


def missing(modules):
    out = []
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                out.append(name)
        except (ImportError, ValueError):
            out.append(name)
    return out


def problem(modules):
    """The one-line explanation, or None when this Python has everything."""
    where = "{} (Python {}.{})".format(sys.executable, *sys.version_info[:2])
    fix = ("submit with --ship-deps (installs the tested set, requirements.lock, for the job), or set ray.runtime_env "
           "(pip/uv, or py_executable pointing at an environment that has them), or start Ray from that environment")
    if tuple(sys.version_info[:2]) != REQUIRES:
        return f"the cluster's python {where} is not Python {REQUIRES[0]}.{REQUIRES[1]}: {fix}"
    absent = missing(modules)
    if absent:
        return "the cluster's python {} cannot import {}: {}".format(where, ", ".join(absent), fix)
    return None


def main(argv):
    why = problem(argv)
    if why:
        sys.stderr.write("error: " + why + "\n")
        sys.stderr.flush()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
