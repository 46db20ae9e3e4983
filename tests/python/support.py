"""Shared set-up for the Python tests run by ctest: where the moba binary, the source tree and a scratch
directory are (environment set by CMakeLists.txt), and a runner that fails with the command's output."""
import os
import shutil
import subprocess
import sys

SOURCE = os.environ.get("MOBA_SOURCE_DIR", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
MOBA = os.environ.get("MOBA_BINARY", os.path.join(SOURCE, "build", "moba"))
SCRIPTS = os.path.join(SOURCE, "scripts")
PYTHON = sys.executable


def scratch(name):
    """A fresh directory under $MOBA_SCRATCH (or build/test-scratch/python)."""
    root = os.environ.get("MOBA_SCRATCH", os.path.join(SOURCE, "build", "test-scratch", "python"))
    path = os.path.join(root, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def run(cmd, cwd=None, expect=0):
    """Runs cmd (a list); returns its stdout+stderr; raises AssertionError on an unexpected exit code."""
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != expect:
        raise AssertionError(f"`{' '.join(cmd)}` exited with {proc.returncode} (expected {expect}):\n{proc.stdout}")
    return proc.stdout


def script(name):
    return os.path.join(SCRIPTS, name)


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"
