"""Ctrl-C or SIGTERM while the command line starts (its modules, torch and transformers loading)
ends a command as it ends one running: one line, nothing written, the exit handlers run, and then
death by the signal (a shell's 130 or 143)."""

import signal
import subprocess
import sys

import pytest

# Sends the signal from inside the import of ``HOOKED``, as a signal arriving while it loads, and
# registers an exit handler there, as a module loaded by the command would (vLLM's shutdown)
SIGNAL_ON_IMPORT = """
import atexit, os, sys

class SignalOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == HOOKED:
            sys.meta_path.remove(self)
            atexit.register(lambda: open(EXITED, "w").close())
            os.kill(os.getpid(), SIGNUM)
        return None

sys.meta_path.insert(0, SignalOnImport())
"""

# What the ``lenvm`` console script runs, and what ``python -m lenvm.cli`` does
ENTRIES = {
    "script": "import re, sys\nfrom lenvm.cli import main\nsys.exit(main())\n",
    "module": "import runpy\nrunpy.run_module('lenvm.cli', run_name='__main__', alter_sys=True)\n",
}


def _interruptible() -> None:
    """Ctrl-C at its default in the child: pytest started in the background by a shell ignores
    SIGINT, and the command line rightly keeps an ignore it inherits."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    "entry, signum, hooked",
    [
        ("script", signal.SIGINT, "lenvm.cli.options"),  # the command line's own modules
        ("module", signal.SIGTERM, "lenvm.cli.options"),
        ("module", signal.SIGINT, "transformers"),  # what the commands load before they run
        ("script", signal.SIGTERM, "transformers"),
    ],
    ids=[
        "script-SIGINT-own",
        "module-SIGTERM-own",
        "module-SIGINT-transformers",
        "script-SIGTERM-transformers",
    ],
)
def test_an_interrupt_while_the_command_line_starts_ends_it_quietly(tmp_path, entry, signum, hooked):
    out = tmp_path / "r.jsonl"
    exited = tmp_path / "exit-handlers-ran"
    code = f"HOOKED, SIGNUM, EXITED = {hooked!r}, {int(signum)}, {str(exited)!r}\n"
    code += SIGNAL_ON_IMPORT + ENTRIES[entry]
    argv = ["rollout", "--model", str(tmp_path / "gen"), "--prompts", str(tmp_path / "p.jsonl")]
    done = subprocess.run(
        [sys.executable, "-c", code, *argv, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_interruptible,
    )
    # Ended by the signal (a shell says 128 + its number), as a supervisor expects of a stop.
    assert (done.returncode, done.stderr) == (-signum, "lenvm: interrupted\n")
    assert exited.exists() and not out.exists()


@pytest.mark.parametrize("entry", ["script", "module", "main(argv)"])
def test_a_closed_stdout_ends_the_command_line_by_sigpipe_and_main_argv_with_its_status(entry):
    """``lenvm models list | head -0``: quietly, and as the process's command line by SIGPIPE (a
    shell's 141), as a C tool ends; ``main(argv)`` called from Python only returns 141."""
    code = ENTRIES.get(entry, "import sys\nfrom lenvm.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    run = subprocess.Popen(
        [sys.executable, "-c", code, "models", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    run.stdout.close()  # before the command writes its first line
    err = run.stderr.read().decode()
    expected = 141 if entry == "main(argv)" else -signal.SIGPIPE
    assert (run.wait(timeout=60), err) == (expected, "")
