"""Direction discovery: activation capture, PCA of fine-tuning differences, SAE latents and attribution."""

from caft_jax.discovery.capture import (  # noqa: F401
    capture_activations,
    capture_pairs,
    iter_activations,
    iter_pairs,
    pair_pca,
    positions_mask,
)
from caft_jax.discovery.pca import PCAResult, StreamingPCA, load_pca, pca_exact, pca_layers, save_pca  # noqa: F401
from caft_jax.discovery.sae import (  # noqa: F401
    SAE,
    letter_batches,
    load_batchtopk_sae,
    load_jumprelu_sae,
    load_sae,
    mean_latent_diff,
    rank_latents,
    sae_attribution,
    sae_on_diff,
)
