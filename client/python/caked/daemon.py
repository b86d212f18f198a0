"""daemon.py - a private caked for tools and tests: started with its socket in a new
directory, waited for until it answers, and stopped when its user is done - at the end of a
with block, or at the process's exit, an uncaught exception and SIGTERM included, so a tool
that fails or is stopped by `timeout` leaves no daemon behind (SIGKILL still can)."""
import atexit
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from . import Client


class Private:
    """A caked of one's own:

        with caked.daemon.Private(binary, "--host-pool", "1G") as d:
            client = caked.Client(d.sock)

    or start() and later stop() (else the process's exit stops it). args follow --socket;
    stderr: where caked's log goes (default: discarded). start() raises RuntimeError when
    caked exits or does not answer within `timeout` seconds."""

    def __init__(self, binary, *args, stderr=subprocess.DEVNULL, timeout=10.0):
        self.binary, self.args, self.stderr, self.timeout = binary, list(args), stderr, timeout
        self.proc = self.sock = self.dir = None

    def start(self):
        if self.proc is not None:
            raise RuntimeError("this caked was started already")
        exit_on_sigterm()
        self.dir = tempfile.mkdtemp(prefix="caked-")
        self.sock = os.path.join(self.dir, "caked.sock")
        self.proc = subprocess.Popen([self.binary, "--socket", self.sock, *self.args],
                                     stdout=subprocess.DEVNULL, stderr=self.stderr)
        atexit.register(self.stop)
        end = time.monotonic() + self.timeout
        while True:
            try:
                Client(self.sock, map_pool=False).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    rc = self.stop()
                    raise RuntimeError(f"{self.binary} did not start (exit status {rc})")
                time.sleep(0.02)

    def stop(self):
        """Stops caked (SIGTERM; SIGKILL after 10 s) and returns its exit status (None if it
        never started). Idempotent."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        atexit.unregister(self.stop)
        try:
            os.rmdir(self.dir)  # caked removes its socket on a clean exit
        except OSError:
            pass
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def exit_on_sigterm():
    """SIGTERM (timeout(1), kill) becomes SystemExit in the main thread, so the exit handlers
    stop the daemons; a handler the program set itself is left alone."""
    if (threading.current_thread() is threading.main_thread() and
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
