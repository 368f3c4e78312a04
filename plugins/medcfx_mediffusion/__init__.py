"""medcfx plugin: Mediffusion (Kaleta et al. 2025), a joint latent diffusion model whose UNet is both the
denoiser and the feature extractor of a classifier; semi-supervised, and self-explaining through
counterfactuals guided by its own classifier.

Methods: ``mediffusion-ae`` (the KL autoencoder of the latent space) and ``mediffusion`` (train, predict,
evaluate, explain, sample). See docs/methods/mediffusion.md.
"""

from medcfx import hookimpl


@hookimpl
def register_methods(register):
    from medcfx_mediffusion.methods import methods

    for method in methods():
        register(method)
