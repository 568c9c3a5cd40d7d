"""DeepSpeed's C++ ops (cpu_adam, async_io), loaded once per process and only compiled when asked.

`DeepSpeedOp(builder).status(build=...)` answers (usable, reason if not) and loads the op on the first
success; a failure to import or build is remembered, "not built yet" is not (a later call with build=True
may compile it: about 100 s once, cached by torch's extension builder after).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any


class DeepSpeedOp:
    def __init__(
        self,
        builder: str,
        label: str,
        *,
        not_built_hint: str,
        incompatible_hint: str = "",
        installed_key: str | None = None,
        precheck: Callable[[], str | None] | None = None,
    ) -> None:
        self.builder = builder  # class name in deepspeed.ops.op_builder
        self.label = label  # e.g. "cpu_adam", for messages
        self.not_built_hint = not_built_hint
        self.incompatible_hint = incompatible_hint
        self.installed_key = (
            installed_key  # deepspeed.git_version_info.installed_ops key (ahead-of-time build)
        )
        self.precheck = precheck  # a platform check: the reason it cannot work here, or None
        self.lock = threading.Lock()
        self.module: Any = None
        self.failure: str | None = None

    def _builder(self) -> Any:
        import deepspeed.ops.op_builder as builders

        return getattr(builders, self.builder)()

    def prebuilt(self) -> bool:
        """Whether the op is installed or already JIT-compiled (loading it then takes seconds, not minutes)."""
        if self.installed_key is not None:
            try:
                from deepspeed.git_version_info import installed_ops  # type: ignore[import-not-found]

                if installed_ops.get(self.installed_key):
                    return True
            except Exception:  # noqa: BLE001 - best effort
                pass
        try:
            from torch.utils.cpp_extension import _get_build_directory

            name = self._builder().name
            return os.path.exists(os.path.join(_get_build_directory(name, verbose=False), f"{name}.so"))
        except Exception:  # noqa: BLE001 - best effort: "not built"
            return False

    def status(self, *, build: bool) -> tuple[bool, str]:
        """(usable, reason if not); loads the op (compiling it only if ``build``)."""
        with self.lock:
            if self.module is not None:
                return True, ""
            if self.failure is not None:
                return False, self.failure
            if self.precheck is not None:
                reason = self.precheck()
                if reason:
                    return False, reason
            try:
                builder = self._builder()
            except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
                self.failure = f"deepspeed is not importable: {exc}"
                return False, self.failure
            if not builder.is_compatible(verbose=False):
                self.failure = f"DeepSpeed's {self.label} op is not compatible here{self.incompatible_hint}"
                return False, self.failure
            if not build and not self.prebuilt():
                # not cached as a failure: a later call with build=True may compile it
                return False, f"DeepSpeed's {self.label} op is not built yet ({self.not_built_hint})"
            try:
                self.module = builder.load(verbose=False)
            except BaseException as exc:  # noqa: BLE001 - compiler errors surface as many exception types
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self.failure = f"building DeepSpeed's {self.label} op failed: {type(exc).__name__}: {exc}"
                return False, self.failure
            return True, ""
