"""Plugin manager: built-in plugins plus the ``medcfx`` entry-point group.

``MEDCFX_PLUGINS`` filters entry-point plugins: a comma-separated list; ``name`` allows (when any name is
listed without a sign, only the listed plugins load), ``-name`` blocks. Unknown hook names in a plugin are
rejected (``check_pending``). A plugin that fails to import is reported by ``medcfx plugins`` and skipped,
so one broken third-party plugin does not take the whole tool down.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

from medcfx import hookspecs
from medcfx.errors import MedcfxError, UsageError
from medcfx.method import Method

ENTRY_POINT_GROUP = "medcfx"
BUILTINS: tuple[str, ...] = ()  # module paths of plugins that ship inside medcfx itself


@dataclass
class PluginInfo:
    name: str
    source: str  # "builtin" or the distribution "name version"
    module: str
    status: str  # "loaded", "blocked", "failed: ..."
    hooks: tuple[str, ...] = ()


def _filter(env: str | None) -> tuple[set[str], set[str]]:
    allow, block = set(), set()
    for part in (env or "").split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("-"):
            block.add(part[1:])
        else:
            allow.add(part.lstrip("+"))
    return allow, block


class Plugins:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("medcfx")
        self.pm.add_hookspecs(hookspecs)
        self.info: list[PluginInfo] = []
        self._methods: dict[str, Method] | None = None
        allow, block = _filter(os.environ.get("MEDCFX_PLUGINS"))
        for modname in BUILTINS:
            self._register(modname, importlib.import_module(modname), "builtin")
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown"
            if ep.name in block or (allow and ep.name not in allow):
                self.info.append(PluginInfo(ep.name, dist, ep.value, "blocked by MEDCFX_PLUGINS"))
                continue
            if self.pm.has_plugin(ep.name):
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin is reported, not fatal
                msg = f"failed: {type(exc).__name__}: {exc}".splitlines()[0]
                self.info.append(PluginInfo(ep.name, dist, ep.value, msg))
                print(f"medcfx: warning: plugin '{ep.name}' could not be loaded ({msg[8:]}); "
                      f"set MEDCFX_PLUGINS=-{ep.name} to skip it", file=sys.stderr)
                continue
            self._register(ep.name, module, dist)

    def _register(self, name: str, module, source: str) -> None:
        self.pm.register(module, name=name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            raise MedcfxError(f"plugin '{name}' implements an unknown hook: {str(exc).splitlines()[0]}") from None
        hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(module) or []))
        self.info.append(PluginInfo(name, source, getattr(module, "__name__", str(module)), "loaded", hooks))

    def methods(self) -> dict[str, Method]:
        if self._methods is None:
            found: dict[str, Method] = {}

            for impl in self.pm.hook.register_methods.get_hookimpls():

                def register(method: Method, _plugin=impl.plugin_name) -> None:
                    if not isinstance(method, Method):
                        raise MedcfxError(f"plugin '{_plugin}' registered {method!r}, not a medcfx Method")
                    if method.name in found:
                        raise MedcfxError(
                            f"method '{method.name}' is registered twice (plugins '{found[method.name].plugin}' and '{_plugin}')"
                        )
                    method.plugin = _plugin
                    found[method.name] = method

                impl.function(register=register)
            self._methods = dict(sorted(found.items()))
        return self._methods

    def method(self, name: str) -> Method:
        methods = self.methods()
        if name not in methods:
            known = ", ".join(methods) or "none installed"
            raise UsageError(f"unknown method '{name}' (known: {known})")
        return methods[name]

    def add_commands(self, app) -> None:
        self.pm.hook.register_commands(app=app)


_PLUGINS: Plugins | None = None


def get_plugins(reload: bool = False) -> Plugins:
    global _PLUGINS
    if _PLUGINS is None or reload:
        _PLUGINS = Plugins()
    return _PLUGINS
