"""``polish3d align`` as a RELION job: External-job inputs, exit markers, SIGTERM, the error line.

RELION runs an External job as ``<executable> --o <job folder> --in_parts … --in_3dref …
--pipeline_control <job folder> [user --label value pairs]`` and waits for
``RELION_JOB_EXIT_SUCCESS`` or ``RELION_JOB_EXIT_FAILURE`` in the job folder. :func:`run_job`
gives every run of the command line that behaviour: whatever ends it (bad input, a fault,
SIGINT, SIGTERM), the one-line summary goes into ``<o>/polish3d.log`` and, in pipeline mode, the
failure marker is written — unless the folder was refused (it would overwrite an input, or
another run holds its lock).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from polish3d import output_folder
from polish3d.errors import InputError, OutputRefused, Terminated

log = logging.getLogger("polish3d")

__all__ = ["JOB_INPUTS", "job_inputs", "parse_extra", "run_job"]

#: inputs RELION hands an External job (``--in_parts`` …), taken from the extra arguments
JOB_INPUTS = ("in_parts", "in_3dref", "in_mask", "in_coords", "in_mics", "in_movies")

T = TypeVar("T")


def run_job(out_dir: str, pipeline: bool, extra_args: list[str],
            start: Callable[[dict[str, str], bool], T]) -> T:
    """Run ``start(job inputs, pipeline mode)`` with RELION's job conventions.

    Args:
        out_dir: ``--o``.
        pipeline: ``--pipeline_control`` was given (an External job also when ``--in_parts`` or
            ``--in_3dref`` are among the extra arguments).
        extra_args: arguments the command line did not know: RELION's ``--in_*`` inputs and user
            ``--label value`` pairs (unknown labels are warned about, as RELION does).
        start: the run; gets ``{in_parts: …, in_3dref: …}`` and whether this is pipeline mode.

    Raises:
        InputError: no ``--o``, or a malformed extra argument; anything ``start`` raises.
        Terminated: SIGTERM arrived (the exit code is 143).
    """
    if not out_dir:
        raise InputError("--o (output directory) is required")
    previous = None
    if threading.current_thread() is threading.main_thread():
        _received.clear()
        previous = signal.signal(signal.SIGTERM, _handle_sigterm)
    try:
        extra = parse_extra(extra_args)
        inputs = {key: extra.pop(key) for key in JOB_INPUTS if key in extra}
        pipeline = pipeline or any(inputs.get(k) for k in ("in_parts", "in_3dref"))
        if extra:
            log.warning("unknown options ignored: %s", " ".join("--" + k for k in extra))
        outcome = start(inputs, pipeline)
        if _received:  # the handler's exception was swallowed (raised inside a gc callback)
            raise Terminated(_received[-1])
        return outcome
    except BaseException as exc:
        if not isinstance(exc, OutputRefused):
            _record_failure(Path(out_dir), exc, pipeline)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _record_failure(out: Path, exc: BaseException, pipeline: bool) -> None:
    if pipeline:  # RELION waits for a marker in the job folder: make sure there is one
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass
        output_folder.write_marker(out, False)
    output_folder.log_error_line(out, exc)


#: signals received by :func:`_handle_sigterm` (its exception can be lost: Python ignores
#: exceptions raised in garbage-collector callbacks, where a signal handler may happen to run)
_received: list[int] = []


def _handle_sigterm(signum, frame):
    _received.append(signum)
    raise Terminated(signum)


def job_inputs(inputs, job: dict[str, str]):
    """``inputs`` (:class:`polish3d.driver.AlignInputs`) completed by RELION's job inputs.

    ``--in_parts`` is the optimisation set or the particle set; ``--in_3dref`` one half map (the
    other is found by swapping ``half1``/``half2`` in its name); ``--in_mask`` the mask. Flags
    given explicitly win.
    """
    if job.get("in_parts"):
        if _is_optimisation_set(job["in_parts"]):
            inputs.i = inputs.i or job["in_parts"]
        else:
            inputs.p = inputs.p or job["in_parts"]
    if job.get("in_3dref"):
        ref = job["in_3dref"]
        if "half2" in Path(ref).name:
            inputs.ref2 = inputs.ref2 or ref
            inputs.ref1 = inputs.ref1 or _swap_half(ref)
        else:
            inputs.ref1 = inputs.ref1 or ref
            inputs.ref2 = inputs.ref2 or _swap_half(ref)
    if job.get("in_mask"):
        inputs.mask = inputs.mask or job["in_mask"]
    return inputs


def _swap_half(path: str) -> str:
    for a, b in (("half1", "half2"), ("half2", "half1")):
        if a in Path(path).name:
            return str(Path(path).with_name(Path(path).name.replace(a, b)))
    raise InputError(f"--in_3dref {path}: cannot find the other half map (no 'half1'/'half2' in the name)")


def _is_optimisation_set(path: str) -> bool:
    from polish3d.io.star import read_star

    blocks = read_star(path)
    for b in blocks.values():
        keys = b.keys() if isinstance(b, dict) else getattr(b, "columns", [])
        if any(str(k).startswith("rlnTomoParticlesFile") or str(k) == "rlnTomoTomogramsFile" for k in keys):
            return True
    return False


def parse_extra(extra: list[str]) -> dict[str, str]:
    """User ``--label value`` pairs of a RELION External job (unknown flags: warned, as RELION).

    Raises:
        InputError: a single-dash option (``-i``: flags take two dashes) or a stray argument that
            follows no ``--label`` — neither is dropped silently.
    """
    out: dict[str, str] = {}
    i = 0
    while i < len(extra):
        tok = extra[i]
        if tok.startswith("--") and len(tok) > 2:
            val = extra[i + 1] if i + 1 < len(extra) and not extra[i + 1].startswith("--") else ""
            if val.startswith("-") and not _is_number(val):
                val = ""
            out[tok[2:]] = val
            i += 2 if val else 1
        elif tok.startswith("-") and not _is_number(tok):
            raise InputError(
                f"{tok}: unknown option; polish3d flags take two dashes (did you mean -{tok}?)"
            )
        else:
            raise InputError(
                f"unexpected argument {tok!r}: every input is given with a flag (--i, --p, --t, …)"
            )
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


