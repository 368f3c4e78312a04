"""medcfx plugin "sanchez": lesion localisation by healthy counterfactuals (Sanchez et al. 2022).

Registers the methods ``sanchez``, ``cdpm-healthy``, ``cdpm-classifier`` and ``threshold`` (the paper's
baselines) and the command ``medcfx sweep`` (guidance scale x noise level, as in the paper's Fig. 3).
"""

from medcfx import hookimpl


@hookimpl
def register_methods(register):
    from .methods import methods

    for m in methods():
        register(m)


@hookimpl
def register_commands(app):
    from .sweep import add_sweep_command

    add_sweep_command(app)
