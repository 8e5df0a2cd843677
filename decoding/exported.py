"""Traced searches kept on disk, so that a second run of the same command traces nothing.

JAX's persistent compilation cache (``runtime.compilation_cache``) skips XLA's compilation, but its
key is the lowered program, so every run still traces and lowers each batch shape's search
first: the encoder, the cache and four decoder-step loops (three cache phases and the shrunk
batch). On the 902 dev sentences of the default model that was 1.9-2.6 s for each of the 5
batch shapes, a quarter of a warm ``decode.py`` run. ``jax.export`` serializes the lowered
program (StableHLO); a later run deserializes it (7 ms) and goes straight to the compilation
cache (0.8 s).

Each file is ``<directory>/<key>.jaxexport``. The key is a SHA-256 of everything the traced
program depends on, so a file is only ever read back for the program it was made from:

* the source of the project's packages (``model``, ``decoding``, ``data``, ``training``,
  ``interop``): any change of code makes new keys;
* the jax, jaxlib and flax versions and the JAX options that change lowering;
* the caller's description of the function (model config, search, token ids, static
  arguments: ``Translator``'s);
* the arguments' tree, shapes and dtypes.

A file that cannot be read back is exported again (with a warning) and replaced; files are
written to a temporary name and renamed, so a crash never leaves a truncated one. Reading a
file marks it used; beyond ``MAX_FILES`` (about 0.5 MB each) the least recently used go, so
the directory does not grow with every change of code. Deleting it is always safe. Only
single-device programs are kept (a sharded search is traced as before).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import jax

log = logging.getLogger(__name__)

PACKAGES = ("model", "decoding", "data", "training", "interop")
SUFFIX = ".jaxexport"
MAX_FILES = 256
_CODE_HASH: str | None = None


def code_fingerprint() -> str:
    """A SHA-256 of the project's package sources (computed once per process)."""
    global _CODE_HASH
    if _CODE_HASH is None:
        root, digest = Path(__file__).resolve().parents[1], hashlib.sha256()
        for package in PACKAGES:
            for path in sorted((root / package).rglob("*.py")):
                digest.update(str(path.relative_to(root)).encode() + b"\0")
                digest.update(path.read_bytes() + b"\0")
        _CODE_HASH = digest.hexdigest()
    return _CODE_HASH


@functools.cache
def _versions() -> str:  # Looking them up takes milliseconds: once per process.
    versions = []
    for name in ("jax", "jaxlib", "flax"):
        try:
            versions.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name}=?")
    return " ".join(versions)


def _environment() -> str:
    options = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl")
    device = jax.devices()[0]
    values = [f"{name}={getattr(jax.config, name)}" for name in options]
    return " ".join([_versions(), *values, device.platform, device.device_kind])


def signature(args) -> str:
    """The arguments' tree structure, shapes and dtypes, as text."""
    leaves, tree = jax.tree.flatten(args)
    return f"{tree} " + " ".join(f"{leaf.dtype}{list(leaf.shape)}" for leaf in leaves)


def dispatch(
    cache: ExportedCache | None, jitted: Callable, fn: Callable, description: str, *args, **static
):
    """``jitted(*args, **static)``, or the same program through ``cache`` when there is one.

    Args:
      cache: an ``ExportedCache``, or None for plain jit.
      jitted: ``jax.jit(fn, static_argnames=<the names in static>)``.
      fn: the function.
      description: what its program depends on besides the code, the arguments' shapes and
        ``static`` (configs, ids baked into the program).
      args: its array arguments.
      static: its static arguments.
    """
    if cache is None:
        return jitted(*args, **static)
    return cache(f"{description} {sorted(static.items())}", functools.partial(fn, **static), *args)


def _key_impl(x):
    """The PRNG implementation of a typed key array, or None for anything else."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_impl(x)
    return None


class ExportedCache:
    """Calls functions of arrays through exports kept in ``directory``.

    Args:
      directory: where the ``.jaxexport`` files live (created when first needed).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._calls: dict[str, Callable] = {}

    @classmethod
    def for_mesh(cls, directory: str | Path | None, mesh) -> ExportedCache | None:
        """A cache in ``directory`` if given and the mesh (or, without one, the process) has a
        single device; None otherwise (sharded searches are traced as before)."""
        one_device = (jax.device_count() if mesh is None else mesh.size) == 1
        return cls(directory) if directory and one_device else None

    def key(self, description: str, args) -> str:
        """The file key of ``description`` called with ``args``."""
        text = "\n".join([code_fingerprint(), _environment(), description, signature(args)])
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def __call__(self, description: str, fn: Callable, *args):
        """``fn(*args)``, traced at most once per key: from this process's memory, from
        ``directory``, or by exporting it there.

        Args:
          description: everything ``fn``'s program depends on besides the code and ``args``'
            shapes (configs, static arguments, ids baked into the program).
          fn: a function of the array pytrees ``args`` (its static arguments bound).
          args: its arguments; typed PRNG keys among them travel as their data (an exported
            program takes plain arrays) and reach ``fn`` as keys again.
        """
        impls = [_key_impl(x) for x in args]
        data = [
            x if i is None else jax.random.key_data(x) for x, i in zip(args, impls, strict=True)
        ]
        key = self.key(description, args)  # a typed key's dtype names its implementation
        call = self._calls.get(key)
        if call is None:

            def with_keys(*values):
                pairs = zip(values, impls, strict=True)
                return fn(
                    *(x if i is None else jax.random.wrap_key_data(x, impl=i) for x, i in pairs)
                )

            exported = self._load(key) or self._export(key, with_keys, data)
            call = jax.jit(exported.call)
            self._calls[key] = call
        return call(*data)

    def _load(self, key: str):
        path = self.path(key)
        if not path.exists():
            return None
        try:
            exported = jax.export.deserialize(bytearray(path.read_bytes()))
            os.utime(path)  # recently used: kept by _prune
            return exported
        except Exception as err:  # noqa: BLE001 (any unreadable file is exported again)
            log.warning("cannot read the exported search %s (%s); exporting it again", path, err)
            return None

    def _export(self, key: str, fn: Callable, args):
        exported = jax.export.export(jax.jit(fn))(*args)
        tmp = None
        try:
            blob = exported.serialize()
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as out:
                out.write(blob)
            os.replace(tmp, self.path(key))
            tmp = None
            self._prune()
        except (OSError, ImportError) as err:  # Not saving only costs the next run a trace.
            log.warning("cannot save the exported search in %s (%s)", self.directory, err)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        return exported

    def _prune(self) -> None:
        """Deletes the least recently used files beyond ``MAX_FILES``."""
        files = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                files.append((path.stat().st_mtime, path))
            except FileNotFoundError:  # another process pruned it
                pass
        for _, path in sorted(files)[: max(0, len(files) - MAX_FILES)]:
            path.unlink(missing_ok=True)
