"""`diffprune prune|finetune|train|sample|evaluate|report|demo`: one module per subcommand.

Each subcommand module in `diffprune.cli` (`cli/<name>.py`) exposes `register(subparsers)`, which
adds its parser and sets `func`; `main` imports only the module of the subcommand it runs, so
`diffprune --help` and `--version` start without torch or diffusers. `main` is the one error
boundary around every subcommand: whatever fails, the user gets one
line on stderr and an exit code, never a traceback:

- 2: bad input (DiffpruneError; also input nested too deeply for Python to read),
- 1: the environment (EnvironmentFailure, a full disk, a forbidden or read-only path, out of
  memory) and internal errors (a bug: set DIFFPRUNE_DEBUG=1 to see its traceback),
- 130: interrupted (Ctrl-C), 143: terminated (SIGTERM). Both unwind normally, so output locks and
  temporary folders are removed.
"""

# ruff: noqa: E402 - the Ctrl-C handler below is set before the other imports
from __future__ import annotations

import os
import signal
import sys

COMMANDS = ("prune", "finetune", "train", "sample", "evaluate", "report", "demo", "encode-prompts")


def requested_command(argv: Sequence[str]) -> str | None:
    """The subcommand `argv` runs (its first word that is not an option), if it names one."""
    first = next((str(a) for a in argv if not str(a).startswith("-")), None)
    return first if first in COMMANDS else None


def _command_name(argv: Sequence[str]) -> str:
    command = requested_command(argv)
    return f"diffprune {command}" if command else "diffprune"


def _exit_interrupted(signum, frame) -> None:
    """The command's Ctrl-C until its work starts (imports, parsing): nothing is written yet, so stop at
    once; raised inside an import, a KeyboardInterrupt could be swallowed or leave a traceback."""
    os.write(2, f"{_command_name(sys.argv[1:])}: interrupted\n".encode())
    os._exit(130)


def _launched_as_command() -> bool:
    """Whether this process runs `diffprune` (the console script or `python -m diffprune.cli`), known while
    this package imports: `python -m` sets argv[0] to "-m" until the module is found."""
    if sys.argv[:1] == ["-m"]:
        argv = getattr(sys, "orig_argv", [])
        return "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "diffprune.cli"
    return os.path.basename(sys.argv[0]).removesuffix(".exe") == "diffprune"


# First, before any other import: only what Python runs before this line (its start, site, the diffprune
# package) can still be hit by a Ctrl-C with a traceback.
if _launched_as_command() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _exit_interrupted)

import argparse
import contextlib
import errno
import importlib
import logging
import threading
from collections.abc import Callable, Collection, Iterator, Sequence

from ..errors import ENVIRONMENT_ERRNOS, DiffpruneError, environment_failure, os_errno, reason_of

DEBUG_ENV = "DIFFPRUNE_DEBUG"

# The line `diffprune --help` shows per subcommand, known without importing the subcommand (whose
# options may need torch/diffusers): the same `help=` each commands module registers, which
# tests/test_layout.py checks. Only the subcommand being run (or asked for help) is imported.
SUMMARIES = {
    "prune": "prune a pipeline's UNet and write a pruned pipeline folder",
    "finetune": "post-train a (pruned) pipeline: Adam, EMA, dropout, grad clip, optional KD",
    "train": "train a fresh UNet2DModel (e.g. the pruned architecture's 'scratch' baseline)",
    "sample": "generate images from a (pruned) pipeline folder",
    "evaluate": "FID/KID, SSIM consistency, params/MACs and latency of samples and models",
    "report": "self-contained HTML + Markdown report: metrics, sample pairs, loss curves, widths",
    "demo": "prune, fine-tune, sample, evaluate and report on the embedded digits DDPM",
    "encode-prompts": "encode prompts with a pipeline's text encoders into a file for --prompt-embeds",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors also say which subcommand and exit 2 with one line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` (locks, temp folders) runs."""


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The `diffprune` parser. `commands` names the subcommands registered in full by their module
    (default: all); the others get a parser that only carries their one-line summary."""
    parser = _Parser(prog="diffprune", description=__doc__.splitlines()[0])
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"diffprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        if commands is not None and name not in commands:
            sub.add_parser(name, help=SUMMARIES[name], add_help=False)
            continue
        module_name = name.replace("-", "_")  # encode-prompts: cli/encode_prompts.py
        try:
            module = importlib.import_module(f".{module_name}", __package__)
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.{module_name}":
                raise
            continue
        module.register(sub)
    return parser


# Library notices a correct run should not show: transformers (5.x) warns on first use of each image
# processor that torchvision is missing and it falls back to PIL; no diffprune stage uses those processors.
QUIET_LOGGERS = ("transformers.utils.import_utils",)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = _command_name(argv)
    command = requested_command(argv)
    args = None
    try:
        with _signals_as_interrupts() as start_work:
            logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
            for logger_name in QUIET_LOGGERS:
                logging.getLogger(logger_name).setLevel(logging.ERROR)
            parser = build_parser({command} if command else ())  # imports torch, diffusers: seconds
            _raise_if_interrupted()
            args = parser.parse_args(argv)
            start_work()
            args.func(args)
    except Terminated:
        _forget_interrupt()
        print(f"{name}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        _forget_interrupt()
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one boundary: every failure becomes one line
        if os.environ.get(DEBUG_ENV) and not isinstance(err, DiffpruneError):
            raise
        code, message = failure_line(err, None if args is None else _output_of(args))
        print(f"{name}: error: {message}", file=sys.stderr)
        return code
    return 0


def _forget_interrupt() -> None:
    """Exit with our code after an interrupt we handled. CPython remembers a KeyboardInterrupt that
    ended a string `exec` (dataclasses and other libraries build code that way while torch and
    diffusers import) even when a caller caught it, and `python -m` then ends the process by SIGINT
    after ours returned (Py_RunMain checks the flag); each string `exec` clears the flag first."""
    exec("None")  # a constant string: only to clear that flag


def failure_line(err: Exception, output: str | None) -> tuple[int, str]:
    """(exit code, one-line message) for any exception a subcommand let through."""
    if isinstance(err, DiffpruneError):
        return err.exit_code, _first_line(err)
    code = os_errno(err)
    if code in ENVIRONMENT_ERRNOS:
        filename = getattr(err, "filename", None)
        if filename and code in (errno.EACCES, errno.EPERM):  # may be an input being read
            return 1, f"{reason_of(code)}: {filename}"
        return 1, str(environment_failure(err, filename or output or "the output"))
    if isinstance(err, RecursionError):
        return 2, ("an input is nested too deeply to read (RecursionError); check the JSON/config files "
                   "given to this command")
    if isinstance(err, MemoryError):
        return 1, "out of memory; use a smaller --batch-size or a machine with more memory"
    if isinstance(err, OSError):
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        return 1, f"{err.strerror or _first_line(err)}{where}"
    return 1, (f"internal error {type(err).__name__}: {_first_line(err)} (a bug in diffprune; "
               f"rerun with {DEBUG_ENV}=1 for the traceback and report it)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _output_of(args: argparse.Namespace) -> str | None:
    """The path this subcommand writes, to name in an environment error without a file name."""
    for key in ("output_dir", "output"):
        value = getattr(args, key, None)
        if value:
            return str(value)
    return None


_SIGINTS: list[int] = []  # Ctrl-Cs that main() called in-process saw before the command's work started


def _remember_sigint(signum, frame) -> None:
    _SIGINTS.append(signum)


def _raise_if_interrupted() -> None:
    if _SIGINTS:
        _SIGINTS.clear()
        raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[Callable[[], None]]:
    """While a subcommand runs, SIGTERM raises Terminated (a KeyboardInterrupt) once; a second
    SIGTERM gets the previous handler's behaviour (by default: stop at once). Until the command calls
    the function yielded (its work starts: imports and parsing done), a Ctrl-C ends the `diffprune`
    process at once (`_exit_interrupted`) or, in-process, is remembered and raised then: raised inside an
    import, a library's bare `except:` could swallow it or leave a traceback. From then on Ctrl-C raises
    KeyboardInterrupt at once."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None  # signal handlers can only be set from the main thread; leave the default there
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        with _sigint_deferred_until_work() as start_work:
            yield start_work
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _sigint_deferred_until_work() -> Iterator[Callable[[], None]]:
    sigint = signal.getsignal(signal.SIGINT)
    ours = sigint in (signal.default_int_handler, _exit_interrupted)  # else an embedding program's own

    def start_work() -> None:
        if ours:  # set again: an import may have replaced it
            signal.signal(signal.SIGINT, signal.default_int_handler)
        _raise_if_interrupted()

    if sigint is signal.default_int_handler:
        signal.signal(signal.SIGINT, _remember_sigint)
    try:
        yield start_work
    finally:
        _SIGINTS.clear()  # one not raised (--help, a usage error) must not interrupt a later main()
        if ours:  # the command's: a Ctrl-C while Python shuts down after main() is ignored, not a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN if sigint is _exit_interrupted else sigint)
