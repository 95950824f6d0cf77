"""File helpers: atomic writes, and JSONL that reports the file and line of bad input."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import numbers
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeGuard


class InputError(ValueError):
    """Bad user input: a malformed file, a missing field, an out-of-range option."""


def is_int(x: Any) -> TypeGuard[int]:
    """An integer that is not a bool (``True`` must not pass as a count): a Python int or a NumPy
    one (the JSON writers here write NumPy numbers as plain ones; type checkers take it as the int
    it compares and counts as)."""
    # The plain int first: checking against the numbers ABC costs several times as much, and
    # reading rollouts checks every token id.
    return type(x) is int or (isinstance(x, numbers.Integral) and not isinstance(x, bool))


def positive_count(value: Any, what: str) -> int:
    """``value`` as a plain int where it is an integer of at least 1 (a NumPy one included, a
    bool not); else an :class:`InputError` naming ``what``, the option it was given as."""
    if not is_int(value) or value < 1:
        raise InputError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def plain_numbers(settings: Any) -> None:
    """The fields of the dataclass ``settings`` that hold NumPy numbers (a seed or a count taken
    from an array) made Python ones, which the checks (:func:`is_real`) take; a NumPy bool stays
    what it is, and is refused as a number."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, bool) or type(value) in (int, float):
            continue
        if is_int(value):
            object.__setattr__(settings, f.name, int(value))
        elif isinstance(value, numbers.Real):
            object.__setattr__(settings, f.name, float(value))


def is_real(x: Any) -> bool:
    """A finite int or float that is not a bool (an int too large for a float is not)."""
    if not isinstance(x, int | float) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def outside_vocabulary(ids: list[int], vocab: int, what: str = "the prompt") -> str | None:
    """Why the token ids ``ids`` of ``what`` cannot be fed to a model of ``vocab`` ids, or None:
    one of them lies outside ``[0, vocab)`` (ids made by another tokenizer, or mistyped)."""
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is None:
        return None
    return f"{what} holds token id {bad}, outside the vocabulary (0-{vocab - 1})"


def refuse_renamed(out: str | os.PathLike, pid: str, other: str | None) -> None:
    """Refuse to resume into ``out`` a prompt that it holds under another id, ``other``: resuming
    would do the prompt again under its new id, beside the old (an older lenvm numbered the prompts
    of a file with ``prompt_id`` fields by position)."""
    if other is not None:
        raise InputError(
            f"{out} holds prompt {pid!r} under another id, {other!r}: resuming would do it again under "
            "its new id, beside the old (an earlier lenvm numbered the prompts of a file with 'prompt_id' "
            "fields by position); give the prompts the ids the file has, or use another output file"
        )


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL file of objects; blank lines are skipped, bad lines name file and line."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    for _, record in numbered_jsonl(path):
        yield record


def numbered_jsonl(
    path: str | os.PathLike, complete_only: bool = False, stdin: bool = False
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each non-blank line of a UTF-8 JSONL file (a byte-order mark
    is allowed at its start, and refused, by its line, at the start of a later one);
    ``complete_only`` leaves out a last line without its newline (a crash's partial write). With
    ``stdin``, a path of ``-`` reads the standard input (once: for files read once). A pipe
    (``/dev/stdin``, a shell's ``<(...)``) is read as it comes, once (see :func:`is_pipe`)."""
    if stdin and str(path) == "-":
        context: Any = contextlib.nullcontext(sys.stdin.buffer)
        path = Path("<stdin>")
    else:
        path = Path(path)
        if path.is_dir():
            raise InputError(f"{path}: a folder, not a JSONL file")
        if not path.exists():
            raise InputError(f"{path}: no such file")
        context = path.open("rb")
    with context as fh:
        for lineno, raw in enumerate(fh, start=1):
            if complete_only and not raw.endswith(b"\n"):
                return
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise InputError(
                    f"{path}:{lineno}: not UTF-8 text (byte {err.start + 1} of the line)"
                ) from None
            if not line.strip():
                continue
            if line.startswith("\ufeff"):  # the first line's was decoded away
                raise InputError(
                    f"{path}:{lineno}: the line starts with a byte-order mark (U+FEFF), which belongs "
                    "only at the start of a file: files were joined here, one of them beginning with "
                    "it; remove it from this line"
                )
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    Works for files and folders alike. On any error (a full disk included) the temporary is
    removed and whatever stood at ``path`` before is left untouched.
    """
    path = replaceable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as err:  # named by the path asked for, not by the temporary one
        raise OSError(err.errno, err.strerror, str(path)) from None
    target = tmp / path.name
    try:
        yield target
        _settle(target)
        if path.is_dir() and target.is_dir():
            # Directories cannot be replaced in one rename: swap through a backup name, put back
            # if the swap is cut short (the backup would go with the temporary folder).
            backup = tmp / (path.name + ".old")
            try:
                os.replace(path, backup)
                os.replace(target, path)
            except BaseException:
                if backup.exists() and not path.exists():
                    os.replace(backup, path)
                raise
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _settle(path: Path) -> None:
    """Flush every file under ``path`` to disk, readable as any new file of this process is
    (some writers, safetensors among them, create files that only their owner may read)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        os.chmod(file, _FILE_MODE)
        with file.open("rb") as fh:
            os.fsync(fh.fileno())


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()  # what open() gives a new file under this process's umask


class RunLock:
    """An advisory lock of the operating system (``flock``) on a file or folder that a run writes,
    held until :meth:`release` (or the end of a ``with`` block, or of the process, however it
    ends: a crashed run leaves no lock behind). Two runs writing one output would truncate or
    overwrite each other's work; the second gets an :class:`InputError` naming ``what`` the first
    is doing. A file is created if missing, and removed again if it is still empty when the lock
    is released (a run that stopped before writing leaves nothing behind). Where ``flock`` does
    not exist (Windows) nothing is locked."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.what = Path(path), what
        self._fd: int | None = None
        try:
            import fcntl
        except ImportError:
            return
        self._created = not self.path.exists()
        flags = os.O_RDONLY if self.path.is_dir() else os.O_RDONLY | os.O_CREAT
        self._fd = os.open(self.path, flags, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            raise InputError(
                f"another run is {self.what} ({self.path}): wait for it to end, or choose another output"
            ) from None

    def release(self) -> None:
        if self._fd is None:
            return
        if self._created and self.path.is_file() and self.path.stat().st_size == 0:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def replaceable(path: str | os.PathLike) -> Path:
    """Where a new file or folder for ``path`` goes: the path a symbolic link names (the link
    stays), refusing a device, pipe or socket (``/dev/null``, ``/dev/stdout``), which a new file
    renamed over it would replace for every process on the machine."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:  # nothing there yet (or a dangling link: its target is written)
        mode = None
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InputError(f"{path} is not a regular file (a device or a pipe?): give a file path to write")
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def changed_settings(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """The settings, by name, whose value stored with a run's results and value given now differ
    (two spellings of one existing path are one value), sorted."""

    def same(a: Any, b: Any) -> bool:
        if a == b:
            return True
        if isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
        return False

    return sorted(k for k in stored.keys() | given.keys() if not same(stored.get(k), given.get(k)))


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, naming ``path``, where a file or folder could not be written there atomically (a
    read-only or full disk, no permission; a device or pipe), rather than after the work that
    would fill it."""
    path = replaceable(path)
    folders = [path.parent] + ([path] if path.is_dir() else [])  # a temporary beside it, or inside
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(path)) from None


def is_pipe(path: str | os.PathLike) -> bool:
    """Whether ``path`` names something that exists but is neither a file nor a folder: a pipe
    (``/dev/stdin``, a shell's ``<(...)``) or a device, whose content can be read only once."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def file_digest(path: str | os.PathLike) -> str:
    """A short hash of a file's bytes (of a folder's: its files' names and bytes), so that results
    made from it are not reused once it has changed. A pipe is refused: hashing it would use up
    what the run then reads."""
    path = Path(path)
    if is_pipe(path):
        raise InputError(f"{path}: a pipe can be read only once, and this is read twice: save it to a file")
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with open(file, "rb") as fh:
            for block in iter(functools.partial(fh.read, 1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def fingerprint(data: Any) -> str:
    """A short stable hash of JSON-able ``data`` (a NumPy number hashes as the plain one)."""
    text = json.dumps(data, sort_keys=True, default=json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_file_target(path: str | os.PathLike) -> None:
    if Path(path).is_dir():
        raise InputError(f"{path}: a folder, not a file to write")


def json_text(data: Any, **options: Any) -> str:
    """``json.dumps`` of ``data`` with a figure that is not a number (NaN, an infinity: a metric
    with nothing to measure) written as ``null``, since JSON has no such values and other readers
    refuse the ``NaN`` Python writes; NumPy numbers and bools are written as plain ones."""
    return json.dumps(_finite(data), allow_nan=False, **options)


def _finite(data: Any) -> Any:
    if type(data) in _AS_THEY_ARE:  # first: a rollout record's token ids are most of it
        return data
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    if _is_numpy_scalar(data):
        data = _plain(data)
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    return data


_AS_THEY_ARE = frozenset({int, str, bool, type(None)})  # JSON values written unchanged


def _is_numpy_scalar(x: Any) -> bool:
    """A NumPy number or bool (a count or a metric computed with NumPy), which JSON does not take
    as it is. NumPy is looked up, not imported: where it is not loaded there are no NumPy numbers,
    and the command line starts without it."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(x, np.bool_ | np.integer | np.floating)


def _plain(x: Any) -> bool | int | float:
    """The Python bool, int or float of the NumPy scalar ``x``."""
    np = sys.modules["numpy"]
    return bool(x) if isinstance(x, np.bool_) else int(x) if isinstance(x, np.integer) else float(x)


def json_default(x: Any) -> Any:
    """What JSON writes for ``x``, which it does not take: a NumPy scalar's plain value, else
    its text."""
    return _plain(x) if _is_numpy_scalar(x) else str(x)


def write_json(path: str | os.PathLike, data: Any) -> None:
    _check_file_target(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    _check_file_target(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class JsonlAppender:
    """Append-only JSONL writer: each record is one flushed, fsynced line, written as
    :func:`json_text` writes it (a NaN as ``null``).

    A crash can leave at most a partial last line; :func:`repair_jsonl_tail` drops it on resume,
    so lines written earlier are never touched.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_jsonl_tail(self.path)
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        text = "".join(json_text(r, ensure_ascii=False) + "\n" for r in records)
        self._fh.write(text)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl_to_append(
    path: Path, problem: Callable[[dict[str, Any]], str | None], what: str
) -> list[dict[str, Any]]:
    """The records already in ``path`` before resuming into it (none if it does not exist).
    Refuses a file whose complete lines are not all ``what`` records (``problem`` says what is
    wrong with one, or None), so that another file given by mistake is left as it was; then cuts
    a partial last line that a crash left (a whole record without its newline is kept)."""
    if not path.exists():
        return []
    records = []
    lineno = 0
    for lineno, record in numbered_jsonl(path, complete_only=True):
        if (why := problem(record)) is not None:
            raise InputError(f"{path}:{lineno} is not a line of {what} ({why}): write them to another file")
        records.append(record)
    tail = _partial_tail(path)
    if tail.strip():  # whitespace after the last newline is nothing
        # A crash leaves part of one of our lines, which starts as every record does and is not
        # yet JSON. Anything else without its newline is a line of some other file: refused.
        try:
            record = json.loads(tail.decode("utf-8"))
        except ValueError:  # not JSON, or a character cut short
            if not tail.lstrip().startswith(b'{"'):
                raise InputError(f"{path} is not a file of {what}: write them to another file") from None
        else:  # whole JSON: ours only if it is such a record, then kept (an editor's last line)
            why = problem(record) if isinstance(record, dict) else "not a JSON object"
            if why is not None:
                raise InputError(
                    f"{path}:{lineno + 1} is not a line of {what} ({why}): write them to another file"
                )
            records.append(record)
    repair_jsonl_tail(path)
    return records


def _partial_tail(path: Path) -> bytes:
    """The bytes after the last newline of ``path`` (empty when it ends with one)."""
    with path.open("rb") as fh:
        fh.seek(_tail_start(fh))
        return fh.read()


def _tail_start(fh) -> int:
    """The offset just past the last newline of an open binary file (0 without one), read from
    the end: a large file's last line is found without reading the rest."""
    position = fh.seek(0, os.SEEK_END)
    while position > 0:
        size = min(1 << 16, position)
        position -= size
        fh.seek(position)
        found = fh.read(size).rfind(b"\n")
        if found >= 0:
            return position + found + 1
    return 0


def repair_jsonl_tail(path: Path) -> None:
    """End ``path`` with a whole line: a last line that is a whole JSON object gets its newline
    back (a file written by an editor, or by ``"\\n".join``); anything else after the last
    newline (part of a line that a crash left, whitespace) is cut."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return
        start = _tail_start(fh)
        fh.seek(start)
        try:
            whole = isinstance(json.loads(fh.read().decode("utf-8")), dict)
        except ValueError:  # not JSON, or a character cut short
            whole = False
        if whole:
            fh.seek(0, os.SEEK_END)
            fh.write(b"\n")
        else:
            fh.truncate(start)
