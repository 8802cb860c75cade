"""The `kdzoo` command line.

Every error a user can act on (a bad config key or value, a damaged or foreign file, a full disk, a read-only
folder, a file-size limit) is printed as one line ``kdzoo COMMAND: error: ...`` and exits with status 2;
``--debug`` (or ``KDZOO_DEBUG=1``) shows the traceback instead.  Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from .. import __version__
from ..engine.stopping import EXIT_STATUS
from ..errors import Interrupted, KdzooError, safetensors_os_error
from .analysis import add_cka_parser, add_search_parser, add_select_parser
from .bench import add_bench_parser
from .clip import add_clip_parser
from .condense import add_condense_parser
from .diffusion import add_diffusion_parser
from .lm import add_lm_parser
from .methods import add_methods_parser
from .train import add_run_parsers


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("KDZOO_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also come after options such as --resume (a word without "=" there is an override
    # too, refused by the config loader with its own message)
    overrides = [e for e in extra if not e.startswith("-")]
    if hasattr(args, "overrides") and overrides:
        args.overrides += overrides
        extra = [e for e in extra if e not in overrides]
    if extra:
        command = command_name(args)
        print(f"{command}: error: unrecognized arguments: {' '.join(extra)} (see {command} --help)", file=sys.stderr)
        return 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        with _file_size_limit_as_error():
            return args.func(args) or 0
    except BrokenPipeError:  # the reader stopped early (kdzoo methods | head): not an error
        _discard_stdout()
        return 0
    except Interrupted as err:  # SIGTERM / SIGINT: the run saved its checkpoint and stopped
        print(f"{command_name(args)}: {_one_line(str(err))}; {continue_hint(args)}", file=sys.stderr)
        return EXIT_STATUS.get(err.signal_number, 128 + err.signal_number)
    except (KdzooError, OSError) as err:
        if debug:
            raise
        message = str(err) if isinstance(err, KdzooError) else os_error_message(err)
        print(f"{command_name(args)}: error: {_one_line(message)}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        message = peer_failure_message(err)
        if message is None or debug:
            raise
        print(f"{command_name(args)}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command_name(args)}: interrupted; the last checkpoint (if any) is intact; {continue_hint(args)}",
              file=sys.stderr)
        return 130
    except Exception as err:  # a safetensors write that hit a full disk (not an OSError) names no file
        converted = safetensors_os_error(err)
        if converted is None or debug:
            raise
        print(f"{command_name(args)}: error: writing weights failed: {os_error_message(converted)}", file=sys.stderr)
        return 2


def command_name(args) -> str:
    """``kdzoo lm eval``: the command and, for a command with subcommands, the subcommand, as argparse names them."""
    if not getattr(args, "command", None):
        return "kdzoo"
    sub = getattr(args, f"{args.command}_command", None)
    return f"kdzoo {args.command}" + (f" {sub}" if isinstance(sub, str) else "")


def continue_hint(args) -> str:
    """How the interrupted command continues: its own words (``continue_hint`` among a parser's defaults, e.g.
    bench, which resumes by itself), --resume where the command has it, else starting over."""
    if getattr(args, "continue_hint", None):
        return args.continue_hint
    if hasattr(args, "resume"):
        return "run the same command with --resume to continue"
    return "run the command again to start over"


def _discard_stdout() -> None:
    """Point the process's stdout at /dev/null, so the interpreter's final flush into the closed pipe raises
    nothing either (Python's documented recipe for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced by an object without a file descriptor
        pass


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")  # runtime.atomic_write's ".NAME.XXXX.tmp"


def os_error_message(err: OSError) -> str:
    """``PATH: what went wrong (what to do)``; a temporary file of an atomic write is named by its target."""
    path = err.filename
    if path is not None:
        path = Path(os.fsdecode(path))
        match = _TEMPORARY.match(path.name)
        if match:
            path = path.with_name(match["name"])
    hints = {
        errno.ENOSPC: "no space left on the device; free some space, then continue with --resume",
        errno.EDQUOT: "disk quota exceeded; free some space, then continue with --resume",
        errno.EFBIG: "file size limit exceeded (ulimit -f); raise the limit, then continue with --resume",
        errno.EROFS: "read-only file system; choose another output directory",
        errno.EACCES: "permission denied; check the file's permissions, or choose a directory you can write to",
        errno.EPERM: "operation not permitted; choose a directory you can write to",
    }
    what = hints.get(err.errno, err.strerror or type(err).__name__)
    if path is None:
        return f"{what} ({err})" if err.errno not in hints else what
    return f"{path}: {what}"


def peer_failure_message(err: RuntimeError) -> str | None:
    """One line for a collective that failed because another process of a torchrun job died (gloo/NCCL report
    it as a RuntimeError from the transport); None for any other RuntimeError."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    text = str(err)
    if not (isinstance(err, getattr(dist, "DistError", ())) or
            re.search(r"gloo|nccl|Connection (reset|closed|refused)|Broken pipe|timed out", text, re.IGNORECASE)):
        return None
    reason = _one_line(re.sub(r"\[/[^\]]*\]\s*", "", text)).split(". ")[0]
    return (f"another process of the distributed job stopped ({reason}); the last checkpoint is intact: "
            "start every process again with --resume")


def _one_line(message: str) -> str:
    return " ".join(message.split())


@contextmanager
def _file_size_limit_as_error():
    """Under a file-size limit (``ulimit -f``) the kernel kills a process whose write crosses it (SIGXFSZ);
    ignoring the signal turns that write into an ordinary EFBIG error, reported in one line."""
    if not hasattr(signal, "SIGXFSZ") or sys.platform == "win32":
        yield
        return
    try:
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGXFSZ, previous)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdzoo", description="Knowledge distillation on unmodified PyTorch models.",
        epilog="Run 'kdzoo COMMAND --help' for each command's options.  Errors are one line (exit status 2); "
               "add --debug anywhere on the line for the full traceback.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"kdzoo {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_run_parsers(sub)
    add_condense_parser(sub)
    add_lm_parser(sub)
    add_diffusion_parser(sub)
    add_clip_parser(sub)
    add_bench_parser(sub)
    add_search_parser(sub)
    add_cka_parser(sub)
    add_select_parser(sub)
    add_methods_parser(sub)
    return parser


if __name__ == "__main__":
    sys.exit(main())
