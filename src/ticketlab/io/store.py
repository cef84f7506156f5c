"""The run folder: every file written atomically and carrying a checksum and the config hash.

A file either exists whole or not at all (temp file, fsync, rename), so "the output exists" is a
safe test of "this step is done" and resume needs no special code. On reading, a file whose bytes
do not match its checksum, or that belongs to another experiment, is refused with one clear line.
Nothing is unpickled: tensors live in safetensors, everything else in JSON.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import RunWriteError, TicketlabError

CHECKSUM_KEY = "_checksum"
CONFIG_HASH_KEY = "_config_hash"
TMP_PREFIX = ".tmp-"


def atomic_write_bytes(path: Path, payload: bytes, durable: bool = True) -> None:
    """Write whole or not at all; a refusal of the file system (disk full, read-only, permission)
    is one line naming the path (``RunWriteError``), and the previous file, if any, is kept.

    ``durable=False`` skips the fsyncs: the rename still makes the file whole or absent to any
    reader while the machine stays up, and only a power cut could leave it torn. For checkpoints,
    which are checksummed caches (a torn one is discarded and its networks retrain to the same
    bits), that is the right trade: a checkpoint is written every few hundred steps."""
    try:
        _atomic_write_bytes(path, payload, durable)
    except OSError as exc:
        raise RunWriteError(
            f"cannot write {path}: {exc.strerror or exc}; files already finished are kept, "
            "rerun the same command to resume"
        ) from None


def check_writable_folder(root: Path) -> None:
    """Create ``root`` (and its parents) and prove a file can be written there, or refuse in one
    line naming the path: a file in the way, a missing parent that cannot be made, no permission,
    a read-only file system. Called before any training."""
    root = Path(root)
    for parent in [root, *root.parents]:
        if parent.exists() and not parent.is_dir():
            raise TicketlabError(f"cannot use {root} as the run folder: {parent} is a file")
        if parent.exists():
            break
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "probe.", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise TicketlabError(
            f"cannot write the run folder {root}: {exc.strerror or exc}"
            + (f" ({exc.filename})" if exc.filename and str(exc.filename) != str(root) else "")
        ) from None


def _atomic_write_bytes(path: Path, payload: bytes, durable: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fchmod(fh.fileno(), 0o644)  # mkstemp's 0600 would keep a shared run private
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _json_checksum(obj: dict[str, Any]) -> str:
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def _tensor_checksum(tensors: dict[str, torch.Tensor], meta: str, config_hash: str) -> str:
    # the config hash is covered too, so a damaged hash reads as corruption, not as a foreign file
    digest = hashlib.sha256(json.dumps([meta, config_hash]).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        if t.numel():  # the bytes as they lie (a buffer, not a copy: checkpoints are large)
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class RunStore:
    """One run folder. ``config_hash`` is stamped into every file and checked on every read."""

    def __init__(self, root: Path, config_hash: str):
        self.root = Path(root)
        self.config_hash = config_hash

    def path(self, rel: str) -> Path:
        return self.root / rel

    def exists(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(rel).unlink()

    # JSON -----------------------------------------------------------------------------------
    def write_json(self, rel: str, obj: dict[str, Any]) -> None:
        stamped = {**obj, CONFIG_HASH_KEY: self.config_hash}
        stamped[CHECKSUM_KEY] = _json_checksum(stamped)
        atomic_write_bytes(self.path(rel), json.dumps(stamped, indent=1, allow_nan=False).encode())

    def read_json(self, rel: str) -> dict[str, Any]:
        path = self.path(rel)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise TicketlabError(f"{path}: cannot read ({exc.strerror})") from None
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise TicketlabError(f"{path}: corrupted, not valid JSON ({exc})") from None
        if not isinstance(obj, dict) or obj.get(CHECKSUM_KEY) != _json_checksum(obj):
            raise TicketlabError(f"{path}: checksum mismatch, the file is corrupted")
        self._check_owner(path, obj.get(CONFIG_HASH_KEY))
        return {k: v for k, v in obj.items() if k not in (CHECKSUM_KEY, CONFIG_HASH_KEY)}

    # tensors --------------------------------------------------------------------------------
    def write_tensors(
        self,
        rel: str,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any] | None = None,
        owned: bool = False,
        durable: bool = True,
    ) -> None:
        """``owned``: the tensors are the caller's private copies (a checkpoint's are), written
        as they are; otherwise, and for any that share memory (which safetensors refuses), a
        copy is written. ``durable``: see ``atomic_write_bytes``."""
        if owned:
            tensors = _unshared({k: v.detach().contiguous() for k, v in tensors.items()})
        else:
            tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
        meta_json = json.dumps(meta or {}, sort_keys=True)
        header = {
            "meta": meta_json,
            "config_hash": self.config_hash,
            "sha256": _tensor_checksum(tensors, meta_json, self.config_hash),
        }
        atomic_write_bytes(self.path(rel), st_save(tensors, metadata=header), durable)

    def read_tensors(self, rel: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return read_checked_tensors(self.path(rel), self.config_hash)

    def write_state(self, rel: str, state: Any) -> None:
        """A nested structure of tensors, numbers, lists and dicts (a training checkpoint), whose
        tensors are its own copies (``_checkpoint`` and the Ray relay make them so): written
        without another copy, and without fsync (a checkpoint is a checksummed cache)."""
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _flatten(state, tensors)
        self.write_tensors(rel, tensors, {"skeleton": skeleton}, owned=True, durable=False)

    def read_state(self, rel: str) -> Any:
        tensors, meta = self.read_tensors(rel)
        return _unflatten(meta["skeleton"], tensors)

    def _check_owner(self, path: Path, found: Any) -> None:
        if found != self.config_hash:
            raise TicketlabError(
                f"{path}: belongs to another experiment (config hash {found}, "
                f"expected {self.config_hash})"
            )

    # lock -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Held while a run writes here; a second run on the same folder stops at once."""
        self.root.mkdir(parents=True, exist_ok=True)
        fh = open(self.root / ".lock", "a+")  # noqa: SIM115 - held for the duration
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TicketlabError(
                    f"{self.root} is in use by another ticketlab run; wait or use another --out"
                ) from None
            yield
        finally:
            fh.close()

    def leftover_temp_files(self) -> list[Path]:
        return sorted(self.root.rglob(TMP_PREFIX + "*"))

    def clean_temp_files(self) -> None:
        """Remove temp files a killed run left behind (never a finished file)."""
        for path in self.leftover_temp_files():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def read_checked_tensors(
    path: Path, config_hash: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file we wrote, verifying checksum (and owner, when a hash is given)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise TicketlabError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        tensors = st_load(raw)
        header_size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_size]).get("__metadata__") or {}
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise TicketlabError(f"{path}: corrupted, not a valid safetensors file ({exc})") from None
    if "sha256" not in header or "meta" not in header:
        raise TicketlabError(f"{path}: not written by ticketlab (no checksum)")
    if header["sha256"] != _tensor_checksum(tensors, header["meta"], header.get("config_hash", "")):
        raise TicketlabError(f"{path}: checksum mismatch, the file is corrupted")
    if config_hash is not None and header.get("config_hash") != config_hash:
        raise TicketlabError(
            f"{path}: belongs to another experiment (config hash {header.get('config_hash')}, "
            f"expected {config_hash})"
        )
    return tensors, json.loads(header["meta"])


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_flatten(v, tensors) for v in obj]
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj
