"""medcfx plugin "restoration": anomaly maps from image-conditioned diffusion restoration (Baugh et al. 2024).

Registers the methods ``restoration`` (the paper) and ``recon-ddpm`` (the plain reconstruction baseline),
and the command ``medcfx restoration-ensemble REF,REF,... --name N`` that registers several fold models as
one ensemble model. The synthetic anomaly tasks live in the core (:mod:`medcfx.anomalies`); see
docs/methods/restoration.md.
"""

from medcfx import hookimpl


@hookimpl
def register_methods(register):
    from .methods import methods

    for m in methods():
        register(m)


@hookimpl
def register_commands(app):
    import typer

    @app.command("restoration-ensemble")
    def restoration_ensemble(
        refs: str = typer.Argument(..., help="Restoration models to combine: REF,REF[,...]"),
        name: str = typer.Option(..., "--name", help="Registry name of the ensemble."),
    ) -> None:
        """Register restoration fold models as one ensemble model (explain/evaluate average their maps)."""
        from rich.console import Console

        from medcfx.cli_models import get_registry

        from .infer import METHOD, register_ensemble, split_refs

        entry = register_ensemble(get_registry(), split_refs(refs, METHOD), name)
        Console().print(f"registered [bold]{entry.ref}[/bold]: ensemble of "
                        f"{', '.join(m['ref'] for m in entry.config['ensemble'])}")
