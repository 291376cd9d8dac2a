"""Task dataset builders: MCMC spurious-correlation pairs, emergent-misalignment splits, offline generators."""
