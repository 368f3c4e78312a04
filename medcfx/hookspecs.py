"""The hooks a medcfx plugin may implement (pluggy project name ``medcfx``).

A plugin is any importable module exposing functions decorated with ``@medcfx.hookimpl``; it is found
through the ``medcfx`` entry-point group, exactly like the four bundled method plugins under plugins/.

    from medcfx import hookimpl
    from medcfx.method import Method

    @hookimpl
    def register_methods(register):
        register(Method(name="mine", summary="...", trainer=MyTrainer(), capabilities={"train"}))
"""

import pluggy

hookspec = pluggy.HookspecMarker("medcfx")
hookimpl = pluggy.HookimplMarker("medcfx")


@hookspec
def register_methods(register):
    """Register methods: call ``register(method)`` once per :class:`medcfx.method.Method`."""


@hookspec
def register_commands(app):
    """Add commands to the command line: ``app`` is the root :class:`typer.Typer`."""
