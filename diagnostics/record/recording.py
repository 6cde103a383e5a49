"""`Recording`: what a `Recorder` saw during one run, as pandas DataFrames, and its file format.

File format (version 1): one ZIP archive written atomically (temporary file in the same
directory, fsync, ``os.replace``). Its first member ``singd-lab-recording.json`` holds
``{"format": "singd-lab-recording", "version": 1}``; ``recording.json`` holds the name,
``meta``, ``summary`` and, per frame, its columns with their pandas dtypes; numeric and
boolean columns are stored as ``.npy`` arrays (``allow_pickle=False``), text columns as
JSON lists. ZIP keeps a CRC per member, so a truncated or altered file fails loudly.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import pandas as pd

FORMAT = "singd-lab-recording"
VERSION = 1
_HEADER = "singd-lab-recording.json"
_BODY = "recording.json"

#: Columns (and dtypes) of each frame; a fresh recording has these even with zero rows.
COLUMNS: dict[str, dict[str, str]] = {
    # one row per training step the recorder saw. loss, lr (group 0), step_time_s (wall time
    # from the end of the previous recorder.step to the start of this one: the training
    # step without the recorder's own time; step 0: since the recorder was created),
    # record_time_s (the recorder's own time), skipped and the total grad_norm on every
    # step (``step_norms``); update_norm (every step with ``step_norms=True``), param_norm
    # and grad_scale on recorded steps (else NaN)
    "steps": {
        "step": "int64",
        "recorded": "bool",
        "loss": "float64",
        "grad_norm": "float64",
        "update_norm": "float64",
        "param_norm": "float64",
        "lr": "float64",
        "step_time_s": "float64",
        "record_time_s": "float64",
        "grad_scale": "float64",
        "skipped": "bool",
        # recorded steps under a time budget: factors given exact spectra, and those given
        # power-iteration extremes instead (the budget's skips); NaN elsewhere
        "spectra_exact": "float64",
        "spectra_estimated": "float64",
        # error message of the step (`Recorder.record_error`), "" otherwise
        "message": "str",
    },
    # tidy: one row per step x layer x factor x metric
    "metrics": {
        "step": "int64",
        "layer": "str",
        "factor": "str",
        "metric": "str",
        "value": "float64",
    },
    # eigenvalues of each preconditioner factor (descending; index 0 = largest)
    "spectra": {
        "step": "int64",
        "layer": "str",
        "factor": "str",
        "index": "int64",
        "value": "float64",
    },
    # one row per NaN/Inf event, in the order they happened: by step, then phase (forward
    # activations in forward order, the loss, backward from the last layer to the first,
    # factors and state, parameters); ``order`` numbers them across the run; ``kind`` is
    # the layer's module and shape, e.g. "Linear 64→128"
    "events": {
        "step": "int64",
        "order": "int64",
        "phase": "str",
        "layer": "str",
        "kind": "str",
        "tensor": "str",
        "dtype": "str",
        "shape": "str",
        "numel": "int64",
        "n_nan": "int64",
        "n_posinf": "int64",
        "n_neginf": "int64",
        "finite_absmax": "float64",
        "grad_scale": "float64",
        "skipped": "bool",
        # always "" (files written before errors had their own table held them here)
        "message": "str",
    },
    # one row per error that ended or disturbed training (`Recorder.record_error`)
    "errors": {
        "step": "int64",
        "phase": "str",
        "layer": "str",
        "kind": "str",
        "tensor": "str",
        "exception": "str",
        "message": "str",
        "grad_scale": "float64",
    },
    # one row per step x layer x component (optimizer state; "(process)" rows are peaks)
    "memory": {
        "step": "int64",
        "layer": "str",
        "component": "str",
        "bytes": "int64",
    },
}

#: The phases an event can belong to.
PHASES = ("forward", "backward", "preconditioner update", "parameter update")


def _str_dtype() -> str:
    """The dtype name pandas uses for text on this version (``"str"`` on pandas >= 3)."""
    return str(pd.Series(["a"]).dtype)


def empty_frame(kind: str) -> pd.DataFrame:
    """A zero-row frame with the columns and dtypes of ``kind`` (a key of `COLUMNS`)."""
    if kind not in COLUMNS:
        raise ValueError(f"kind must be one of {sorted(COLUMNS)}, got {kind!r}")
    return frame_from_rows(kind, [])


def frame_from_rows(kind: str, rows: list[dict[str, Any]] | dict[str, list]) -> pd.DataFrame:
    """Build a frame of ``kind`` from row dicts (or column lists) with the standard dtypes.

    Extra columns (for ``steps``: scalars logged with `Recorder.log`) are kept as float64.
    """
    spec = COLUMNS[kind]
    df = pd.DataFrame(rows)
    for col in spec:
        if col == "order" and col not in df.columns:  # rows given in the order they happened
            df[col] = np.arange(len(df), dtype=np.int64)
        elif col not in df.columns:
            df[col] = pd.Series([], dtype=object) if len(df) == 0 else None
    out = {}
    text = _str_dtype()
    for col, dtype in spec.items():
        s = df[col]
        if dtype == "str":
            out[col] = s.astype(object).where(s.notna(), "").astype(str).astype(text)
        elif dtype == "bool":
            out[col] = s.fillna(False).astype(bool)
        else:
            out[col] = s.astype(dtype) if dtype != "float64" else pd.to_numeric(s).astype(dtype)
    for col in df.columns:
        if col not in spec:
            out[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return pd.DataFrame(out, index=pd.RangeIndex(len(df)))


class Snapshot(NamedTuple):
    """One factor as it was at one step (the flight recorder's copies, float32 or float64)."""

    step: int
    layer: str
    factor: str
    role: str
    matrix: np.ndarray


@dataclass
class Recording:
    """Everything recorded in one run: DataFrames, run metadata and summary numbers.

    - ``steps``: per-step scalars (loss, grad/update norm, lr, wall time, grad scale, skipped).
    - ``metrics``: tidy ``step, layer, factor, metric, value``.
    - ``spectra``: eigenvalues per ``step, layer, factor`` (``index`` 0 = largest).
    - ``events``: NaN/Inf events in the order they happened (`COLUMNS` lists the fields).
    - ``memory``: ``step, layer, component, bytes``; layer ``"(process)"`` holds peaks.
    - ``meta``: run metadata (config, versions, seed, optimizer, recorder settings, and
      ``meta["layers"]``: each layer's name, kind and position in the forward pass).
    - ``summary``: summary numbers set by training code, e.g. ``summary["test_accuracy"]``.
    - ``errors``: errors recorded with `Recorder.record_error` (exception and message).
    - ``snapshots``: every factor on the last few recorded steps before the first event or
      error and at its step (`Snapshot`; the flight recorder), empty when nothing happened.
    """

    name: str = "run"
    steps: pd.DataFrame = field(default_factory=lambda: empty_frame("steps"))
    metrics: pd.DataFrame = field(default_factory=lambda: empty_frame("metrics"))
    spectra: pd.DataFrame = field(default_factory=lambda: empty_frame("spectra"))
    events: pd.DataFrame = field(default_factory=lambda: empty_frame("events"))
    memory: pd.DataFrame = field(default_factory=lambda: empty_frame("memory"))
    meta: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    errors: pd.DataFrame = field(default_factory=lambda: empty_frame("errors"))
    snapshots: list[Snapshot] = field(default_factory=list)

    FRAMES = ("steps", "metrics", "spectra", "events", "memory", "errors")

    def __repr__(self) -> str:
        st = self.steps
        return (
            f"Recording(name={self.name!r}, steps={len(st)}, "
            f"recorded={int(st['recorded'].sum()) if len(st) else 0}, "
            f"metrics={len(self.metrics)}, spectra={len(self.spectra)}, "
            f"events={len(self.events)}, errors={len(self.errors)}, memory={len(self.memory)}, "
            f"summary={sorted(self.summary)})"
        )

    # ------------------------------------------------------------------ convenience
    def layers(self) -> list[str]:
        """Layers that have factor metrics, in first-seen order."""
        return list(dict.fromkeys(self.metrics["layer"].tolist()))

    def factors(self, layer: str | None = None) -> list[str]:
        """Factors recorded (for one layer, or for any), in first-seen order."""
        m = self.metrics if layer is None else self.metrics[self.metrics["layer"] == layer]
        return list(dict.fromkeys(m["factor"].tolist()))

    def metric(self, metric: str, layer: str | None = None, factor: str | None = None):
        """Rows of ``metrics`` for one metric name (optionally one layer / factor)."""
        m = self.metrics
        sel = m["metric"] == metric
        if layer is not None:
            sel &= m["layer"] == layer
        if factor is not None:
            sel &= m["factor"] == factor
        return m[sel]

    def peak_memory_bytes(self) -> int | None:
        """Largest process peak memory seen (RSS or CUDA, whichever is larger), or None."""
        mem = self.memory[self.memory["layer"] == "(process)"]
        return int(mem["bytes"].max()) if len(mem) else None

    def state_bytes(self, step: int | None = None) -> pd.DataFrame:
        """Optimizer state bytes per layer and component at ``step`` (default: last recorded)."""
        mem = self.memory[self.memory["layer"] != "(process)"]
        if len(mem) == 0:
            return mem
        s = int(mem["step"].max()) if step is None else step
        return mem[mem["step"] == s].reset_index(drop=True)

    def summary_row(self) -> dict[str, Any]:
        """Summary numbers of this run (for tables comparing runs): ``run_summary(self).row()``."""
        from diagnostics.views.summary import run_summary  # the one summary rule lives there

        return run_summary(self).row()

    # ------------------------------------------------------------------ file format
    def save(self, path: str | os.PathLike) -> Path:
        """Write this recording to ``path`` as one file, atomically; returns the path."""
        path = Path(path)
        body: dict[str, Any] = {
            "name": self.name,
            "meta": _json_ready(self.meta, "meta"),
            "summary": _json_ready(self.summary, "summary"),
            "frames": {},
        }
        arrays: dict[str, bytes] = {}
        for fname in self.FRAMES:
            df = getattr(self, fname)
            if not isinstance(df, pd.DataFrame):
                raise TypeError(f"Recording.{fname} must be a pandas DataFrame")
            body["frames"][fname] = _encode_frame(df, fname, arrays)
        body["snapshots"] = _encode_snapshots(self.snapshots, arrays)
        with atomic_file(path, "wb") as raw:
            with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(_HEADER, json.dumps({"format": FORMAT, "version": VERSION}))
                zf.writestr(_BODY, json.dumps(body, allow_nan=True))
                for member, data in arrays.items():
                    zf.writestr(member, data)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recording:
        """Read a recording written by `save`; a truncated or foreign file raises ValueError."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no recording at {str(path)!r}")
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                if not names or names[0] != _HEADER:
                    raise ValueError(f"{str(path)!r} is not a singd-lab recording (no header)")
                header = json.loads(zf.read(_HEADER))
                if header.get("format") != FORMAT:
                    raise ValueError(f"{str(path)!r} is not a singd-lab recording")
                if header.get("version") != VERSION:
                    raise ValueError(
                        f"{str(path)!r} has recording format version {header.get('version')!r}; "
                        f"this code reads version {VERSION}"
                    )
                body = json.loads(zf.read(_BODY))
                frames = {
                    fname: _decode_frame(body["frames"][fname], zf)
                    for fname in cls.FRAMES
                    if fname in body["frames"]
                }
                frames = _upgrade(frames)
                snapshots = _decode_snapshots(body.get("snapshots", []), zf)
        except zipfile.BadZipFile as err:
            raise ValueError(
                f"{str(path)!r} is truncated, corrupt or not a singd-lab recording ({err})"
            ) from err
        except (KeyError, TypeError, json.JSONDecodeError, EOFError, OSError, zlib.error) as err:
            raise ValueError(f"{str(path)!r} is a damaged singd-lab recording ({err!r})") from err
        return cls(
            name=body["name"],
            meta=body["meta"],
            summary=body["summary"],
            snapshots=snapshots,
            **frames,
        )


def _upgrade(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Frames of a file written by older code in today's form: columns added since get
    their empty value, and error rows of the events frame move to ``errors``."""
    if "errors" not in frames:
        ev = frames["events"]
        is_error = ev["message"].astype(str) != "" if "message" in ev else ev["step"] < -1
        rows = []
        for r in ev[is_error].to_dict("records"):
            row = {k: r[k] for k in COLUMNS["errors"] if k in r}
            exc, _, _ = str(r.get("message", "")).partition(":")
            row["exception"] = exc if exc.isidentifier() else ""
            rows.append(row)
        frames["errors"] = frame_from_rows("errors", rows)
        frames["events"] = ev[~is_error].reset_index(drop=True)
    for fname, df in frames.items():
        for col, dtype in COLUMNS.get(fname, {}).items():
            if col in df.columns:
                continue
            if dtype == "str":
                df[col] = pd.Series([""] * len(df), index=df.index, dtype=_str_dtype())
            elif col == "order":
                df[col] = np.arange(len(df), dtype=np.int64)
    return frames


def _encode_snapshots(snapshots: list[Snapshot], arrays: dict[str, bytes]) -> list[dict]:
    """Describe the snapshots for recording.json, their matrices as ``.npy`` members."""
    out = []
    for i, snap in enumerate(snapshots):
        member = f"snapshots/{i}.npy"
        buf = io.BytesIO()
        np.save(buf, np.asarray(snap.matrix), allow_pickle=False)
        arrays[member] = buf.getvalue()
        out.append(
            {"step": int(snap.step), "layer": snap.layer, "factor": snap.factor,
             "role": snap.role, "npy": member}
        )  # fmt: skip
    return out


def _decode_snapshots(specs: list[dict], zf: zipfile.ZipFile) -> list[Snapshot]:
    """Rebuild the snapshots written by `_encode_snapshots`."""
    return [
        Snapshot(
            int(s["step"]),
            s["layer"],
            s["factor"],
            s["role"],
            np.load(io.BytesIO(zf.read(s["npy"])), allow_pickle=False),
        )
        for s in specs
    ]


@contextmanager
def atomic_file(path: Path, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync it and move it over ``path``
    with normal permissions (`file_mode`), on any error remove it: ``path`` is never partial."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; a written file is a normal file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_mode() -> int:
    """Permission bits of a newly created regular file under the current umask (0644 under 022).

    Files made by ``tempfile.mkstemp`` (for atomic writes) are 0600; written files get this.
    Reads the umask from ``/proc/self/status`` where possible (setting it to read it back
    is not thread-safe).
    """
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _json_ready(obj: Any, what: str) -> Any:
    """Check that ``obj`` is JSON data (dict/list/str/number/bool/None); tuples become lists."""
    try:
        return json.loads(json.dumps(obj, allow_nan=True, default=_json_default))
    except (TypeError, ValueError) as err:
        raise TypeError(f"Recording.{what} must hold JSON data only: {err}") from err


def _json_default(value: Any) -> Any:
    """Numbers from numpy / torch become Python numbers; anything else is refused."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON data")


def _encode_frame(df: pd.DataFrame, fname: str, arrays: dict[str, bytes]) -> dict[str, Any]:
    """Describe a frame for recording.json, putting numeric columns into ``arrays``."""
    cols = []
    for i, col in enumerate(df.columns):
        s = df[col]
        dtype = s.dtype
        entry: dict[str, Any] = {"name": str(col), "dtype": str(dtype)}
        if not isinstance(col, str):
            raise TypeError(f"Recording.{fname}: column names must be str, got {col!r}")
        if isinstance(dtype, np.dtype) and dtype.kind in "biufcmM":
            member = f"frames/{fname}/{i}.npy"
            buf = io.BytesIO()
            np.save(buf, s.to_numpy(), allow_pickle=False)
            arrays[member] = buf.getvalue()
            entry["npy"] = member
        elif pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype):
            values = []
            for v in s.tolist():
                if v is None or (isinstance(v, float) and math.isnan(v)):
                    values.append(None)
                elif isinstance(v, str):
                    values.append(v)
                else:
                    raise TypeError(
                        f"Recording.{fname}[{col!r}] holds {type(v).__name__}; "
                        "text columns must hold str or missing values"
                    )
            entry["values"] = values
        else:
            raise TypeError(f"Recording.{fname}[{col!r}] has unsupported dtype {dtype}")
        cols.append(entry)
    index = None
    if not (isinstance(df.index, pd.RangeIndex) and df.index.start == 0 and df.index.step == 1):
        member = f"frames/{fname}/index.npy"
        buf = io.BytesIO()
        np.save(buf, df.index.to_numpy(), allow_pickle=False)
        arrays[member] = buf.getvalue()
        index = member
    return {"columns": cols, "rows": int(len(df)), "index": index}


def _decode_frame(spec: dict[str, Any], zf: zipfile.ZipFile) -> pd.DataFrame:
    """Rebuild a frame written by `_encode_frame`, with the same dtypes."""
    data = {}
    n = int(spec["rows"])
    for entry in spec["columns"]:
        if "npy" in entry:
            arr = np.load(io.BytesIO(zf.read(entry["npy"])), allow_pickle=False)
            s = pd.Series(arr, dtype=entry["dtype"])
        else:
            dtype = entry["dtype"]
            s = pd.Series(entry["values"], dtype=object if dtype == "object" else dtype)
        if len(s) != n:
            raise ValueError(f"column {entry['name']!r} has {len(s)} rows, expected {n}")
        data[entry["name"]] = s
    if spec.get("index"):
        index = pd.Index(np.load(io.BytesIO(zf.read(spec["index"])), allow_pickle=False))
    else:
        index = pd.RangeIndex(n)
    df = pd.DataFrame(data, index=pd.RangeIndex(n))
    df.index = index
    return df
