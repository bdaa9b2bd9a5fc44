"""Read a `torch.save` checkpoint without running any code it carries.

Pretraining scripts pickle more than tensors: simple_llama stores its `TrainingConfig` dataclass, whose module exists
only inside that project. `torch.load(weights_only=True)` refuses such a file, and `weights_only=False` would import
(and, for a hostile file, call) whatever the pickle names. Here every global that torch's weights-only unpickler does
not already trust is stood in for by a *record* class: building an instance of it (pickle's NEWOBJ + BUILD, which is
how dataclasses and plain objects are saved) gives a `LegacyRecord` holding the fields, while calling it (REDUCE, how
`os.system` or `eval` would be smuggled in) is refused. The named module is never imported.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import types
import warnings
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from pathlib import Path
from typing import Any, BinaryIO

from hf_sft.errors import UsageError

# torch's weights-only unpickler rejects these modules before looking at any allow-list.
_BLOCKED_MODULES = ("os", "posix", "nt", "sys")

# numpy scalars and arrays appear in checkpoints that log losses with numpy; torch's docs list these as safe.
_NUMPY_GLOBALS = (
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
)


class _ForbiddenCall(Exception):
    def __init__(self, global_name: str):
        super().__init__(global_name)
        self.global_name = global_name


class _RecordType(type):
    # Unpickling creates records through `cls.__new__` (NEWOBJ), which bypasses this; only a REDUCE/INST, i.e. the
    # pickle asking to *call* the global, reaches `__call__`.
    def __call__(cls, *args, **kwargs):
        raise _ForbiddenCall(cls._global_name)


class LegacyRecord(types.SimpleNamespace, metaclass=_RecordType):
    """The fields of a pickled object whose class was not loaded; `vars(record)` gives them as a dict."""

    _global_name = ""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __setstate__(self, state: Any) -> None:
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif state is not None:
            self.__dict__["_state"] = state
        if isinstance(slots, dict):
            self.__dict__.update(slots)

    def to_dict(self) -> dict[str, Any]:
        """The record's fields as a plain dict."""
        return dict(vars(self))


def load_checkpoint(path: str | Path) -> Any:
    """Load a `torch.save` file on the CPU without importing or calling anything it names.

    Args:
        path: a checkpoint written by `torch.save`, in the zip format (torch >= 1.6) or the legacy one.

    Returns:
        The saved object. Tensors, containers and numbers come back as usual; objects of classes that torch does not
        trust come back as `LegacyRecord` instances holding their fields.

    Raises:
        UsageError: the file is missing or unreadable, or it asks to call a function outside the allow-list.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_error = err
    except Exception as err:  # torch raises RuntimeError/EOFError/... on files that are not checkpoints
        raise UsageError(f"cannot read {path} as a torch checkpoint: {_first_line(err)}") from None

    names = _globals_in_checkpoint(path)
    if names is None:
        raise UsageError(f"{path} is not a checkpoint written by torch.save ({_first_line(first_error)})")
    for name in sorted(set(names.values())):
        if name.split(".")[0] in _BLOCKED_MODULES:
            raise UsageError(_refusal(path, name))
    # torch looks its own allow-list up first, so a record registered for a name torch trusts is never used.
    allowed = {name: _record_class(py3_name) for name, py3_name in names.items()} | _numpy_globals(set(names))
    try:
        with torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items()]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except _ForbiddenCall as err:
        raise UsageError(_refusal(path, err.global_name)) from None
    except Exception as err:
        raise UsageError(f"refusing to load {path}: {_first_line(err)}") from None


def unsafe_globals(path: str | Path) -> list[str]:
    """The globals a torch file's pickle names that Trainer's own loads of checkpoint state would not trust.

    Trainer reads `optimizer.pt`, `scheduler.pt`, `scaler.pt` and `rng_state.pth` with `torch.load(weights_only=True)`
    inside its `safe_globals()` (torch's allow-list plus numpy's arrays and dtypes). Asking torch which globals
    fall outside that same list, statically (nothing is imported or called), lets a resume refuse a tampered file in
    its own words before Trainer reaches it, instead of torch's advice to turn the check off.
    """
    import torch
    from transformers.trainer_pt_utils import safe_globals

    with safe_globals():
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))


def _refusal(path: Path, name: str) -> str:
    return f"refusing to load {path}: it asks to call {name}, which is not allowed in a checkpoint"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    # torch's weights-only message opens with advice to disable the check; the reason is on the WeightsUnpickler line.
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    line = text.splitlines()[0] if text else type(err).__name__
    # Never pass on the advice to load with weights_only=False: for a hostile file that runs its payload.
    return type(err).__name__ if "weights_only" in line else line


def _globals_in_checkpoint(path: Path) -> dict[str, str] | None:
    """Every `module.name` the checkpoint's pickles refer to, read statically (nothing is executed).

    Zip files (torch >= 1.6) hold one `data.pkl`; the legacy format (`_use_new_zipfile_serialization=False`) is a run
    of pickles (magic number, protocol, system info, the object, storage keys) followed by raw storage bytes.
    Python 3 writes some globals under their Python 2 names (`subprocess.check_call` as `commands.check_call`): the
    result maps both spellings to the Python 3 one, which is what messages show.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
                if len(pickles) != 1:
                    return None
                return _pickle_globals(io.BytesIO(archive.read(pickles[0])), count=1)
        with path.open("rb") as stream:
            return _pickle_globals(stream, count=_LEGACY_PICKLES)
    except (zipfile.BadZipFile, ValueError, pickle.UnpicklingError, OSError):
        return None


# torch's legacy format: magic number, protocol version, sys info, the object, then the storage keys.
_LEGACY_PICKLES = 5


def _pickle_globals(stream: BinaryIO, count: int) -> dict[str, str]:
    names: dict[str, str] = {}
    for _ in range(count):
        strings: list[str] = []  # STACK_GLOBAL (protocol 4+) takes module and name from the two strings pushed last
        for opcode, arg, _ in pickletools.genops(stream):
            if opcode.name in ("GLOBAL", "INST"):
                _add_global(names, *arg.split(" ", 1))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                _add_global(names, strings[-2], strings[-1])
            elif isinstance(arg, str):
                strings.append(arg)
    return names


def _add_global(names: dict[str, str], module: str, name: str) -> None:
    py3_module, py3_name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
    names[f"{module}.{name}"] = names[f"{py3_module}.{py3_name}"] = f"{py3_module}.{py3_name}"


def _record_class(global_name: str) -> type[LegacyRecord]:
    module, _, name = global_name.rpartition(".")
    return _RecordType(name, (LegacyRecord,), {"_global_name": global_name, "__module__": module or "__main__"})


def _numpy_globals(names: set[str]) -> dict[str, Any]:
    wanted = [n for n in names if n in _NUMPY_GLOBALS or (n.startswith("numpy.dtypes.") and n.endswith("DType"))]
    if not wanted:
        return {}
    import numpy

    found = {}
    for name in wanted:
        obj: Any = numpy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 renamed numpy.core to numpy._core
            for part in name.split(".")[1:]:
                obj = getattr(obj, part, None)
        if obj is not None:
            found[name] = obj
    if "numpy.dtype" in found:
        # BUILD then sets the state of the dtype instance, whose class (e.g. Float64DType) the pickle never names.
        dtype_classes = vars(getattr(numpy, "dtypes", types.SimpleNamespace()))
        found |= {f"numpy.dtypes.{k}": v for k, v in dtype_classes.items() if k.endswith("DType")}
    return found
