"""Direction discovery: activation capture, PCA of fine-tuning differences, SAE latents and attribution."""

from caft_jax.discovery.autointerp import autointerp_client, autointerp_scores, from_autointerp  # noqa: F401
from caft_jax.discovery.capture import (  # noqa: F401
    capture_activations,
    capture_pairs,
    iter_activations,
    iter_pairs,
    pair_pca,
    positions_mask,
)
from caft_jax.discovery.concept_fit import fit_concept  # noqa: F401
from caft_jax.discovery.concepts import (  # noqa: F401
    ConceptErasure,
    class_mean_direction,
    class_mean_directions,
    inlp_directions,
    leace_directions,
    leace_eraser,
)
from caft_jax.discovery.corpus import iter_texts  # noqa: F401
from caft_jax.discovery.display_report import FeatureDisplay, load_display_json, write_display_report  # noqa: F401
from caft_jax.discovery.displays import latent_encoder, top_contexts, top_contexts_by_layer  # noqa: F401
from caft_jax.discovery.erasure import erasure_check, erasure_check_spec  # noqa: F401
from caft_jax.discovery.latent_scores import (  # noqa: F401
    letter_batches,
    load_ranking,
    mean_latent_diff,
    rank_latents,
    sae_attribution,
    sae_on_diff,
    save_ranking,
)
from caft_jax.discovery.outliers import OutlierRule, Outliers, clean_directions, detect_outliers, keep_mask  # noqa: F401
from caft_jax.discovery.pca import PCAResult, StreamingPCA, load_pca, pca_exact, pca_layers, save_pca  # noqa: F401
from caft_jax.discovery.sae import SAE, load_batchtopk_sae, load_jumprelu_sae, load_sae  # noqa: F401
from caft_jax.discovery.select import (  # noqa: F401
    Selection,
    fit_concepts,
    from_concepts,
    from_selection_file,
    probe_guided,
    random_latents,
    random_orthonormal,
    random_pcs_like,
    random_ranked_latents,
    ranked_latents,
    read_selection,
    top_k_latents,
    top_k_pcs,
)
