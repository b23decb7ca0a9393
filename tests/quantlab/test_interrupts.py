"""SIGTERM/SIGHUP as an interruption: the CLI's form, the recorder's form, and a signal that lands in a finalizer."""
import signal
import subprocess
import sys

from quantlab.interrupts import Terminated, terminate_as_interrupt


def test_handlers_are_installed_and_restored_and_a_programs_own_is_kept():
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with terminate_as_interrupt(only_default=True):  # the recorder's form: the program's handler stays
            assert signal.getsignal(signal.SIGTERM) is mine
        with terminate_as_interrupt():  # the CLI's form: quantlab's for the command's lifetime
            assert signal.getsignal(signal.SIGTERM) is not mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert issubclass(Terminated, KeyboardInterrupt) and str(Terminated(signal.SIGTERM)) == "stopped by SIGTERM"


def test_a_signal_that_lands_in_a_finalizer_is_not_lost():
    # Raised inside __del__, the interruption would be printed as "Exception ignored" and dropped.
    script = (
        "import os, signal, time\n"
        "from quantlab.interrupts import Terminated, terminate_as_interrupt\n"
        "class Finalized:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(0.01)\n"
        "try:\n"
        "    with terminate_as_interrupt():\n"
        "        Finalized()\n"
        "        time.sleep(30)\n"
        "except Terminated as exc:\n"
        "    print(exc, flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=25)
    assert done.stdout.strip() == "stopped by SIGTERM" and "Exception ignored" not in done.stderr, done.stderr
