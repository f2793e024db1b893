"""Variational inference: the guide's distributions and their KLs, the fused kernels, the local-reparameterisation handler, the ELBO."""
