"""setup.py - the caked wheel carries libcake, so `pip install` then `import caked` works
with no CAKE_LIB. libcake is built from this source tree by CMake (the client library alone:
-DCAKE_DAEMON=OFF, portable flags; CUDA as the project's default, CAKE_CUDA=OFF to leave it
out), or copied from CAKE_LIBCAKE=/path/to/libcake.so.0 when that is set, into
caked/_lib/libcake.so.0. The wheel is for this platform and uses the system's
libprotobuf-c (Debian: libprotobuf-c1), and libcudart where libcake was built with CUDA."""
import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(os.path.dirname(HERE))


class PlatformDistribution(Distribution):
    def has_ext_modules(self):
        return True  # it carries a shared library: a platform wheel, not a pure one


def build_libcake(build_base):
    if not os.path.exists(os.path.join(TREE, "CMakeLists.txt")):
        raise RuntimeError("libcake: not in caked's source tree; set CAKE_LIBCAKE to a built "
                           "libcake.so.0")
    out = os.path.abspath(os.path.join(build_base, "libcake"))
    subprocess.check_call(["cmake", "-S", TREE, "-B", out, "-DCMAKE_BUILD_TYPE=Release",
                           "-DCAKE_DAEMON=OFF", "-DCAKE_TESTS=OFF", "-DCAKE_NATIVE=OFF",
                           "-DCAKE_CUDA=" + os.environ.get("CAKE_CUDA", "ON")])
    subprocess.check_call(["cmake", "--build", out, "--target", "cake", "-j",
                           str(os.cpu_count() or 1)])
    return os.path.join(out, "client", "libcake.so.0")


class BuildPyWithLibcake(build_py):
    def run(self):
        super().run()
        lib = os.environ.get("CAKE_LIBCAKE") or build_libcake(
            self.get_finalized_command("build").build_base)
        dst = os.path.join(self.build_lib, "caked", "_lib")
        os.makedirs(dst, exist_ok=True)
        shutil.copyfile(os.path.realpath(lib), os.path.join(dst, "libcake.so.0"))


setup(distclass=PlatformDistribution, cmdclass={"build_py": BuildPyWithLibcake})
