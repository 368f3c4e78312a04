"""medcfx: diffusion counterfactuals for medical images."""

__version__ = "0.1.0"

from medcfx.hookspecs import hookimpl  # noqa: E402  (public: plugins decorate their hooks with it)

__all__ = ["__version__", "hookimpl"]
