"""Rollback by running a configured program: ``helm rollback``, ``kubectl rollout undo``, a flag CLI.

The argv is a list, never a shell string. ``{deployment}``, ``{variant}``, ``{to_version}``,
``{from_version}`` and ``{incident}`` are substituted inside single argv elements; any other
``{identifier}`` is a configuration error, other braces are literal. The values come from events, so each must match
:data:`SAFE_VALUE` and must not start with ``-``: a version named ``--force`` fails the plan
instead of becoming an option.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from typing import Any, Mapping, Sequence

import structlog

from rollbackd.actions.base import ActionResult, RollbackPlan

__all__ = ["CommandBackend", "PLACEHOLDERS", "SAFE_VALUE", "substitute"]

PLACEHOLDERS = ("deployment", "variant", "to_version", "from_version", "incident")
SAFE_VALUE = re.compile(r"[A-Za-z0-9._:/@+-]+")
DEFAULT_MAX_OUTPUT = 64 * 1024
# ``{name}`` (dots and brackets included, so ``{deployment.__class__}`` is caught as unknown) is
# a placeholder; every other brace is literal, so JSON or Python literals pass through as-is.
_TOKEN = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.\[\]]*)\}")

log = structlog.get_logger("rollbackd.actions.command")


def _placeholders(template: str) -> list[str]:
    names = []
    for m in _TOKEN.finditer(template):
        if m.group(1) not in PLACEHOLDERS:
            raise ValueError(
                f"argv element {template!r}: {m.group(0)!r} is not a placeholder "
                f"(known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})"
            )
        names.append(m.group(1))
    return names


def substitute(template: str, values: Mapping[str, str | None]) -> str:
    """``template`` with its placeholders replaced; ``ValueError`` names an unsafe value."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        value = values.get(name)
        if value is None:
            raise ValueError(f"{{{name}}} has no value for this plan")
        if not SAFE_VALUE.fullmatch(value) or value.startswith("-"):
            raise ValueError(
                f"refusing {{{name}}}={value!r}: values must match [A-Za-z0-9._:/@+-]+ and not start with '-'"
            )
        return value

    _placeholders(template)
    return _TOKEN.sub(one, template)


def _plan_values(plan: RollbackPlan) -> dict[str, str | None]:
    return {
        "deployment": plan.deployment,
        "variant": plan.variant,
        "to_version": plan.to_version,
        "from_version": plan.from_version,
        "incident": plan.incident_id,
    }


def _truncate(raw: bytes, limit: int) -> tuple[str, bool]:
    cut = len(raw) > limit
    return raw[:limit].decode("utf-8", "replace"), cut


class CommandBackend:
    """Runs ``argv`` once per ``idempotency_key`` per process; exit 0 is success.

    The child gets only ``PATH``, the variables named in ``env_from`` (copied from this
    process) and ``env``; it runs in its own process group, killed whole on timeout.
    ``current_argv``, if set, is run by :meth:`current` and its stripped stdout is the version.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        env_from: Sequence[str] = (),
        cwd: str | None = None,
        current_argv: Sequence[str] | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
        parent_env: Mapping[str, str] = os.environ,
    ) -> None:
        for name, seq in (("argv", argv), ("current_argv", current_argv)):
            if seq is None:
                continue
            if isinstance(seq, (str, bytes)) or not seq or not all(isinstance(a, str) and a for a in seq):
                raise ValueError(f"{name} must be a non-empty list of non-empty strings, got {seq!r}")
            for element in seq:
                _placeholders(element)
        if not timeout > 0:
            raise ValueError(f"timeout must be in (0, inf) seconds, got {timeout}")
        if isinstance(max_output, bool) or not isinstance(max_output, int) or max_output < 1:
            raise ValueError(f"max_output must be an integer >= 1 (bytes), got {max_output!r}")
        self.argv = tuple(argv)
        self.current_argv = tuple(current_argv) if current_argv is not None else None
        self.timeout = float(timeout)
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.env_from = tuple(env_from)
        self.cwd = cwd
        self.max_output = max_output
        self.parent_env = parent_env
        self._applied: set[str] = set()
        self._lock = threading.Lock()

    def _child_env(self) -> dict[str, str]:
        out = {k: self.parent_env[k] for k in ("PATH", *self.env_from) if k in self.parent_env}
        out.update(self.env)
        return out

    def _run(self, argv: Sequence[str]) -> dict[str, Any]:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self._child_env(),
            cwd=self.cwd,
            start_new_session=True,  # so a timeout kills helpers the program started too
        )
        timed_out = False
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
        stdout, out_cut = _truncate(out, self.max_output)
        stderr, err_cut = _truncate(err, self.max_output)
        return {
            "argv": list(argv),
            "returncode": proc.returncode,
            "timed_out": timed_out,
            "stdout": stdout,
            "stderr": stderr,
            "stdout_truncated": out_cut,
            "stderr_truncated": err_cut,
        }

    def apply(self, plan: RollbackPlan) -> ActionResult:
        key = plan.idempotency_key
        bound = log.bind(deployment=plan.deployment, variant=plan.variant, incident=plan.incident_id,
                         to_version=plan.to_version, idempotency_key=key)
        with self._lock:
            if key in self._applied:
                bound.info("rollback.command", outcome="skipped", attempts=0)
                return ActionResult("skipped", "already applied", attempts=0)
        try:
            argv = [substitute(a, _plan_values(plan)) for a in self.argv]
        except ValueError as exc:
            bound.error("rollback.command", outcome="failed", detail=str(exc))
            return ActionResult("failed", str(exc), attempts=0)
        try:
            data = self._run(argv)
        except OSError as exc:  # program missing or not executable
            detail = f"cannot run {argv[0]!r}: {exc}"
            bound.error("rollback.command", outcome="failed", detail=detail)
            return ActionResult("failed", detail, data={"argv": argv})
        if data["timed_out"]:
            detail = f"timed out after {self.timeout:g}s; process group killed"
        elif data["returncode"] != 0:
            detail = f"exit status {data['returncode']}"
        else:
            with self._lock:
                self._applied.add(key)
            bound.info("rollback.command", outcome="succeeded", returncode=0)
            return ActionResult("succeeded", "exit status 0", data=data)
        bound.error("rollback.command", outcome="failed", detail=detail, returncode=data["returncode"])
        return ActionResult("failed", detail, data=data)

    @property
    def observes(self) -> bool:
        return self.current_argv is not None

    def current(self, deployment: str, variant: str) -> str | None:
        if self.current_argv is None:
            return None
        values = {"deployment": deployment, "variant": variant}
        try:
            argv = [substitute(a, values) for a in self.current_argv]
            data = self._run(argv)
        except (ValueError, OSError):
            return None
        if data["timed_out"] or data["returncode"] != 0:
            return None
        return data["stdout"].strip() or None

    def verify(self, plan: RollbackPlan) -> ActionResult:
        if self.current_argv is None:
            return ActionResult("skipped", "no current_argv configured", attempts=0)
        now = self.current(plan.deployment, plan.variant)
        if now == plan.to_version:
            return ActionResult("succeeded", f"current version is {now}", data={"current": now})
        return ActionResult("failed", f"current version is {now!r}, expected {plan.to_version!r}",
                            data={"current": now})
